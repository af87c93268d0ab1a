//! A condition that holds across syncs (a malformed object, a full map, drift) is logged
//! when it appears, not on every sync while it lasts, and its end once when every one of
//! them is gone.
use std::collections::BTreeSet;

/// The conditions seen by the last round, by key.
#[derive(Debug, Default)]
pub(super) struct LogOnce {
    last: BTreeSet<String>,
}

impl LogOnce {
    /// This round's conditions, each with its key: `log` is called for every one whose key
    /// the last round did not have. Returns true when this round has none and the last one
    /// had some (time to say that all is well again).
    pub(super) fn round<T>(&mut self, items: impl IntoIterator<Item = (String, T)>, mut log: impl FnMut(T)) -> bool {
        let mut now = BTreeSet::new();
        for (key, item) in items {
            if !self.last.contains(&key) && !now.contains(&key) {
                log(item);
            }
            now.insert(key);
        }
        let cleared = now.is_empty() && !self.last.is_empty();
        self.last = now;
        cleared
    }

    /// How many distinct conditions the last round had.
    pub(super) fn len(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::LogOnce;

    fn round(l: &mut LogOnce, keys: &[&str]) -> (Vec<String>, bool) {
        let mut logged = Vec::new();
        let cleared = l.round(keys.iter().map(|k| (k.to_string(), k.to_string())), |k| logged.push(k));
        (logged, cleared)
    }

    #[test]
    fn logs_a_condition_when_it_appears_and_its_end_once() {
        let mut l = LogOnce::default();
        assert_eq!(round(&mut l, &["a", "b", "a"]), (vec!["a".into(), "b".into()], false), "each key once");
        assert_eq!(round(&mut l, &["b", "a"]), (vec![], false), "still there: not again");
        assert_eq!(round(&mut l, &["c", "b"]), (vec!["c".into()], false), "only the new one");
        assert_eq!(l.len(), 2);
        assert_eq!(round(&mut l, &["a"]), (vec!["a".into()], false), "gone, then back: logged again");
        assert_eq!(round(&mut l, &[]), (vec![], true), "all gone: said once");
        assert_eq!(round(&mut l, &[]), (vec![], false));
    }
}
