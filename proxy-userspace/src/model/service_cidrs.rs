//! Service CIDRs (KEP-1880): the ranges ClusterIPs are allocated from, from
//! `networking.k8s.io/v1` ServiceCIDR objects (`spec.cidrs`) and, where the API has none
//! (or for the files source), the `--service-cidr` flag. The datapath refuses new flows to
//! an address inside them that no frontend holds, as kube-proxy's nftables mode filters
//! "unallocated ClusterIPs" (its `cluster-ips-check` chain).
//!
//! Pure: objects in, a set of prefixes and warnings naming the bad objects out.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::ServiceCIDR;

use super::types::{IpPrefix, Warning};

pub const KIND_SERVICE_CIDR: &str = "ServiceCIDR";

/// Every ServiceCIDR object's parsed ranges, and the flag's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceCidrs {
    /// By object name (ServiceCIDRs are cluster-scoped): its valid CIDRs.
    objects: BTreeMap<String, Vec<IpPrefix>>,
    /// One warning per bad entry, by object name.
    warnings: BTreeMap<String, Vec<String>>,
    /// The `--service-cidr` ranges in force (the agent sets them only where ServiceCIDR
    /// objects cannot be had).
    fallback: BTreeSet<IpPrefix>,
}

impl ServiceCidrs {
    /// A ServiceCIDR was added or changed. An object without a name cannot be told apart
    /// from others and is skipped (with a warning).
    pub fn upsert(&mut self, obj: &ServiceCIDR) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        if name.is_empty() {
            bad.push("no metadata.name: skipped".to_string());
        } else {
            for s in obj.spec.as_ref().and_then(|s| s.cidrs.as_ref()).into_iter().flatten() {
                match s.parse::<IpPrefix>() {
                    Ok(p) => ok.push(p),
                    Err(_) => bad.push(format!("spec.cidrs entry {s:?} is not a CIDR: ignored")),
                }
            }
        }
        if bad.is_empty() {
            self.warnings.remove(&name);
        } else {
            self.warnings.insert(name.clone(), bad);
        }
        if !name.is_empty() {
            self.objects.insert(name, ok);
        }
    }

    pub fn delete(&mut self, name: &str) {
        self.objects.remove(name);
        self.warnings.remove(name);
    }

    /// After a relist that saw only `seen` (names): every other object is deleted.
    pub fn retain(&mut self, seen: &BTreeSet<String>) {
        self.objects.retain(|k, _| seen.contains(k));
        self.warnings.retain(|k, _| seen.contains(k));
    }

    pub fn set_fallback(&mut self, cidrs: impl IntoIterator<Item = IpPrefix>) {
        self.fallback = cidrs.into_iter().collect();
    }

    /// The ranges in force: every object's and the fallback's, deduplicated.
    pub fn ranges(&self) -> BTreeSet<IpPrefix> {
        self.objects.values().flatten().copied().chain(self.fallback.iter().copied()).collect()
    }

    pub fn warnings(&self) -> impl Iterator<Item = Warning> + '_ {
        self.warnings.iter().flat_map(|(name, msgs)| {
            msgs.iter().map(move |m| Warning { object: name.clone(), kind: KIND_SERVICE_CIDR, message: m.clone() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, cidrs: &[&str]) -> ServiceCIDR {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"cidrs": cidrs},
        }))
        .expect("ServiceCIDR")
    }

    fn p(s: &str) -> IpPrefix {
        s.parse().expect("prefix")
    }

    /// Both families, objects and the flag together; a bad entry is one warning naming the
    /// object and the entry, the object's other CIDRs still count; removal takes its ranges.
    #[test]
    fn objects_and_fallback_make_the_ranges() {
        let mut c = ServiceCidrs::default();
        c.upsert(&obj("kubernetes", &["10.96.0.0/16", "fd00:10:96::/112"]));
        c.upsert(&obj("extra", &["10.200.0.0/24", "10.300.0.0/24"]));
        c.set_fallback([p("10.96.0.0/16"), p("172.30.0.0/16")]);
        let want: BTreeSet<IpPrefix> =
            ["10.96.0.0/16", "fd00:10:96::/112", "10.200.0.0/24", "172.30.0.0/16"].into_iter().map(p).collect();
        assert_eq!(c.ranges(), want);
        let w: Vec<Warning> = c.warnings().collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!((w[0].kind, w[0].object.as_str()), (KIND_SERVICE_CIDR, "extra"));
        assert!(w[0].message.contains("10.300.0.0/24"), "{}", w[0].message);

        c.delete("extra");
        assert!(!c.ranges().contains(&p("10.200.0.0/24")));
        assert_eq!(c.warnings().count(), 0);
        c.retain(&BTreeSet::new());
        c.set_fallback([]);
        assert!(c.ranges().is_empty());
    }

    /// The ranges do not depend on the order objects arrive in.
    #[test]
    fn order_independent() {
        let a = obj("a", &["10.0.0.0/16"]);
        let b = obj("b", &["fd00::/108", "10.1.0.0/16"]);
        let mut x = ServiceCidrs::default();
        x.upsert(&a);
        x.upsert(&b);
        let mut y = ServiceCidrs::default();
        y.upsert(&b);
        y.upsert(&a);
        assert_eq!(x.ranges(), y.ranges());
    }
}
