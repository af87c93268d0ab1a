//! The in-memory object store, its change history and the registry of open
//! watch streams.
//!
//! Everything lives behind one `std::sync::Mutex` and no lock is held across an
//! `.await`: a change is recorded in the history and pushed into every matching
//! watch channel under the same lock, so a watch that is being set up can never
//! miss or duplicate an event between its replay and its live part.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::ResourceKind;
use super::selector::{FieldSelector, LabelSelector};

/// What the HTTP layer does with one watch stream.
#[derive(Debug)]
pub enum WatchMsg {
    /// One newline-terminated JSON watch event.
    Line(Bytes),
    /// End the response cleanly (terminating chunk).
    Close,
    /// Kill the connection mid-response, as a crashed apiserver or a broken
    /// network would.
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, kept for replay to watches that resume from an older
/// resourceVersion.
struct HistEvent {
    rv: u64,
    kind: ResourceKind,
    ty: EventType,
    object: Arc<Value>,
    /// The object before a MODIFIED change; selector transitions need it.
    old: Option<Arc<Value>>,
}

/// What a list or watch request selects.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

struct Watcher {
    kind: ResourceKind,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

/// A list snapshot kept so that later pages (`continue`) are consistent with
/// the first one, like the apiserver serving all pages at one resourceVersion.
struct ListSnapshot {
    rv: u64,
    /// Each object's JSON as stored: a page is their concatenation, so a
    /// paginated list of 100,000 objects neither deep-copies nor re-encodes any.
    items: Arc<Vec<Bytes>>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub lists: usize,
    pub watches: usize,
    pub gets: usize,
}

/// How a watch request starts.
pub enum WatchStart {
    /// `resourceVersion` unset or "0": synthetic ADDED events for the current
    /// state, then live events.
    CurrentState,
    /// `sendInitialEvents=true`: like `CurrentState`, followed by a BOOKMARK
    /// annotated `k8s.io/initial-events-end`.
    InitialEvents,
    /// Replay every change after this resourceVersion, then live events.
    After(u64),
}

/// An object and its JSON encoding.
type Stored = (Arc<Value>, Bytes);

const MAX_SNAPSHOTS: usize = 64;
const MAX_REQUEST_LOG: usize = 10_000;

pub struct State {
    /// Last resourceVersion handed out; global across all resources, as etcd's.
    rv: u64,
    /// Each object with its JSON, encoded once when stored: lists and initial
    /// watch events copy those bytes instead of serialising the object again (at
    /// 100,000 objects the encoding, not the client, was the start-up's bound).
    objects: [BTreeMap<(String, String), Stored>; 4],
    history: VecDeque<HistEvent>,
    pub history_limit: usize,
    /// Events at or below this resourceVersion are gone from the history; a
    /// watch from an older resourceVersion is answered with 410 Expired.
    compacted_rv: u64,
    watchers: Vec<Watcher>,
    uid_counter: u64,
    snapshots: HashMap<u64, ListSnapshot>,
    snapshot_order: VecDeque<u64>,
    next_snapshot: u64,
    pub counters: [Counters; 4],
    pub request_log: VecDeque<String>,
    pub unavailable: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            // Start above 0: "0" has the special meaning "any version" on the wire.
            rv: 1,
            objects: Default::default(),
            history: VecDeque::new(),
            history_limit: 10_000,
            compacted_rv: 0,
            watchers: Vec::new(),
            uid_counter: 0,
            snapshots: HashMap::new(),
            snapshot_order: VecDeque::new(),
            next_snapshot: 0,
            counters: Default::default(),
            request_log: VecDeque::new(),
            unavailable: false,
        }
    }
}

fn key_of(kind: ResourceKind, obj: &Value) -> (String, String) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| panic!("fake apiserver: {} without metadata.name", kind.kind()))
        .to_string();
    let ns = if kind.namespaced() {
        obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string()
    } else {
        String::new()
    };
    (ns, name)
}

/// RFC 3339 UTC timestamp with second precision, as Kubernetes writes them.
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A watch event line around an object's stored JSON.
fn event_line_encoded(ty: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(ty.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    event_line_encoded(ty, &encode(object))
}

fn encode(object: &Value) -> Vec<u8> {
    serde_json::to_vec(object).expect("serializing a JSON value cannot fail")
}

pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn bookmark(kind: ResourceKind, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata})
}

/// Which event (if any) a watcher with `filter` sees for a change. A
/// modification that moves an object into or out of the selection is seen as
/// ADDED or DELETED, as the apiserver does.
fn visible(filter: &Filter, ty: EventType, object: &Value, old: Option<&Value>) -> Option<EventType> {
    let now = filter.matches(object);
    match ty {
        EventType::Added | EventType::Deleted => now.then_some(ty),
        EventType::Modified => match (old.is_some_and(|o| filter.matches(o)), now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
    }
}

/// Outcome of a paginated list request.
pub enum ListOutcome {
    Page {
        rv: u64,
        /// Each object's JSON.
        items: Vec<Bytes>,
        continue_token: Option<String>,
        remaining: usize,
    },
    /// The continue token is unknown or expired.
    Expired,
}

impl State {
    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn log_request(&mut self, line: String) {
        if self.request_log.len() >= MAX_REQUEST_LOG {
            self.request_log.pop_front();
        }
        self.request_log.push_back(line);
    }

    pub fn objects(&self, kind: ResourceKind) -> Vec<Value> {
        self.objects[kind.index()].values().map(|(o, _)| (**o).clone()).collect()
    }

    pub fn get(&self, kind: ResourceKind, ns: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { ns } else { "" };
        self.objects[kind.index()].get(&(ns.to_string(), name.to_string())).map(|(o, _)| (**o).clone())
    }

    /// Creates or replaces an object; returns the stored version. Replacing an
    /// object with identical content is a no-op, like an apiserver update
    /// that changes nothing (no new resourceVersion, no event).
    pub fn apply(&mut self, kind: ResourceKind, mut obj: Value) -> Value {
        obj["kind"] = json!(kind.kind());
        obj["apiVersion"] = json!(kind.api_version());
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let meta = obj["metadata"].as_object_mut().expect("metadata is an object");
        if kind.namespaced() {
            let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
            if ns.is_empty() {
                meta.insert("namespace".into(), json!("default"));
            }
        } else {
            meta.remove("namespace");
        }
        let key = key_of(kind, &obj);
        let old = self.objects[kind.index()].get(&key).map(|(o, _)| o.clone());
        match &old {
            Some(old) => {
                let meta = obj["metadata"].as_object_mut().expect("metadata is an object");
                // Server-owned fields survive a replace.
                for field in ["uid", "creationTimestamp", "resourceVersion"] {
                    match old["metadata"].get(field) {
                        Some(v) => meta.insert(field.into(), v.clone()),
                        None => meta.remove(field),
                    };
                }
                if **old == obj {
                    return obj;
                }
            }
            None => {
                let meta = obj["metadata"].as_object_mut().expect("metadata is an object");
                // Keep a uid the test chose (e.g. to match ownerReferences).
                if meta.get("uid").and_then(Value::as_str).is_none_or(str::is_empty) {
                    self.uid_counter += 1;
                    let uid = format!("00000000-0000-4000-8000-{:012x}", self.uid_counter);
                    meta.insert("uid".into(), json!(uid));
                }
                if !meta.get("creationTimestamp").is_some_and(Value::is_string) {
                    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
                }
            }
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let encoded = Bytes::from(encode(&obj));
        let obj = Arc::new(obj);
        self.objects[kind.index()].insert(key, (obj.clone(), encoded.clone()));
        let ty = if old.is_some() { EventType::Modified } else { EventType::Added };
        self.record(kind, ty, (obj.clone(), encoded), old);
        (*obj).clone()
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&mut self, kind: ResourceKind, ns: &str, name: &str) -> bool {
        let ns = if kind.namespaced() { ns } else { "" };
        let Some((old, _)) = self.objects[kind.index()].remove(&(ns.to_string(), name.to_string())) else {
            return false;
        };
        // The DELETED event carries the final state at the deletion's resourceVersion.
        self.rv += 1;
        let mut obj = (*old).clone();
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let encoded = Bytes::from(encode(&obj));
        self.record(kind, EventType::Deleted, (Arc::new(obj), encoded), None);
        true
    }

    /// One change: to every watch that sees it (the object encoded once for all of them),
    /// and into the history.
    fn record(&mut self, kind: ResourceKind, ty: EventType, (object, encoded): Stored, old: Option<Arc<Value>>) {
        self.watchers.retain(|w| {
            if w.kind != kind {
                return true;
            }
            match visible(&w.filter, ty, &object, old.as_deref()) {
                // A failed send means the client went away: forget the watcher.
                Some(seen) => w.tx.send(WatchMsg::Line(event_line_encoded(seen.as_str(), &encoded))).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push_back(HistEvent { rv: self.rv, kind, ty, object, old });
        while self.history.len() > self.history_limit {
            if let Some(ev) = self.history.pop_front() {
                self.compacted_rv = ev.rv;
            }
        }
    }

    /// Lists matching objects. The first page takes a snapshot; `continue`
    /// tokens walk that snapshot.
    pub fn list(
        &mut self,
        kind: ResourceKind,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> ListOutcome {
        let (rv, items, offset) = match continue_token {
            Some(token) => {
                let parsed = token
                    .split_once('-')
                    .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
                let Some(snap) = parsed.and_then(|(id, off)| Some((self.snapshots.get(&id)?, off))) else {
                    return ListOutcome::Expired;
                };
                (snap.0.rv, snap.0.items.clone(), snap.1)
            }
            None => {
                let items: Vec<Bytes> = self.objects[kind.index()]
                    .values()
                    .filter(|(o, _)| filter.matches(o))
                    .map(|(_, encoded)| encoded.clone())
                    .collect();
                (self.rv, Arc::new(items), 0)
            }
        };
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let end = offset.saturating_add(limit).min(items.len());
        let page = items.get(offset..end).unwrap_or_default().to_vec();
        let remaining = items.len().saturating_sub(end);
        let continue_token = (remaining > 0).then(|| {
            let id = match continue_token.and_then(|t| t.split_once('-')?.0.parse().ok()) {
                Some(id) => id,
                None => self.store_snapshot(rv, items.clone()),
            };
            format!("{id}-{end}")
        });
        ListOutcome::Page { rv, items: page, continue_token, remaining }
    }

    fn store_snapshot(&mut self, rv: u64, items: Arc<Vec<Bytes>>) -> u64 {
        self.next_snapshot += 1;
        let id = self.next_snapshot;
        self.snapshots.insert(id, ListSnapshot { rv, items });
        self.snapshot_order.push_back(id);
        while self.snapshot_order.len() > MAX_SNAPSHOTS {
            if let Some(old) = self.snapshot_order.pop_front() {
                self.snapshots.remove(&old);
            }
        }
        id
    }

    /// Opens a watch. Returns the receiving end of its stream, already holding
    /// the replayed or initial events. When the start resourceVersion is too
    /// old, the stream holds a single 410 ERROR event and then closes.
    pub fn watch(
        &mut self,
        kind: ResourceKind,
        filter: Filter,
        bookmarks: bool,
        start: WatchStart,
    ) -> mpsc::UnboundedReceiver<WatchMsg> {
        let (tx, rx) = mpsc::unbounded_channel();
        let send = |line: Bytes| {
            // The receiver is in our hand, so this cannot fail.
            let _ = tx.send(WatchMsg::Line(line));
        };
        match start {
            WatchStart::CurrentState | WatchStart::InitialEvents => {
                for (_, encoded) in self.objects[kind.index()].values().filter(|(o, _)| filter.matches(o)) {
                    send(event_line_encoded("ADDED", encoded));
                }
                if matches!(start, WatchStart::InitialEvents) {
                    send(event_line("BOOKMARK", &bookmark(kind, self.rv, true)));
                }
            }
            WatchStart::After(from) => {
                if from < self.compacted_rv {
                    let msg = format!("too old resource version: {from} ({})", self.compacted_rv);
                    send(event_line("ERROR", &status(410, "Expired", &msg)));
                    let _ = tx.send(WatchMsg::Close);
                    return rx;
                }
                for ev in self.history.iter().filter(|e| e.rv > from && e.kind == kind) {
                    if let Some(seen) = visible(&filter, ev.ty, &ev.object, ev.old.as_deref()) {
                        send(event_line(seen.as_str(), &ev.object));
                    }
                }
            }
        }
        self.watchers.push(Watcher { kind, filter, bookmarks, tx });
        rx
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that
    /// asked for bookmarks.
    pub fn send_bookmarks(&mut self) {
        let rv = self.rv;
        self.watchers.retain(|w| {
            !w.bookmarks || w.tx.send(WatchMsg::Line(event_line("BOOKMARK", &bookmark(w.kind, rv, false)))).is_ok()
        });
    }

    /// Forgets all history and makes every resourceVersion handed out so far
    /// too old; open watches get a 410 ERROR event and are closed.
    pub fn force_gone(&mut self) {
        // Bump the version so that even a client that is fully up to date
        // holds an expired resourceVersion and has to relist.
        self.rv += 1;
        self.compacted_rv = self.rv;
        self.history.clear();
        self.snapshots.clear();
        self.snapshot_order.clear();
        let msg = format!("too old resource version: forced by test ({})", self.rv);
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::Line(event_line("ERROR", &status(410, "Expired", &msg))));
            let _ = w.tx.send(WatchMsg::Close);
        }
    }

    /// Ends every open watch, either abruptly or cleanly.
    pub fn end_watches(&mut self, abort: bool) {
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(if abort { WatchMsg::Abort } else { WatchMsg::Close });
        }
    }

    pub fn open_watches(&mut self, kind: ResourceKind) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.iter().filter(|w| w.kind == kind).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_format() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }

    #[test]
    fn selector_transitions_become_add_and_delete() {
        let filter = Filter { labels: LabelSelector::parse("a=1").unwrap(), ..Default::default() };
        let with = json!({"metadata": {"name": "x", "labels": {"a": "1"}}});
        let without = json!({"metadata": {"name": "x", "labels": {"a": "2"}}});
        assert_eq!(visible(&filter, EventType::Modified, &with, Some(&without)), Some(EventType::Added));
        assert_eq!(visible(&filter, EventType::Modified, &without, Some(&with)), Some(EventType::Deleted));
        assert_eq!(visible(&filter, EventType::Modified, &without, Some(&without)), None);
    }

    #[test]
    fn history_trim_expires_old_versions() {
        let mut st = State { history_limit: 2, ..Default::default() };
        for i in 0..4 {
            st.apply(ResourceKind::Node, json!({"metadata": {"name": format!("n{i}")}}));
        }
        let mut rx = st.watch(ResourceKind::Node, Filter::default(), false, WatchStart::After(2));
        match rx.try_recv() {
            Ok(WatchMsg::Line(l)) => {
                assert!(std::str::from_utf8(&l).unwrap().contains("\"code\":410"))
            }
            other => panic!("expected a 410 line, got {other:?}"),
        }
    }
}
