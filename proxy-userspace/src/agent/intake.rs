//! The reconciler's object side: every change of the source parsed into the translation as
//! it arrives, from the agent's first moments on. The source starts before the programs
//! are verified (`until`), so the initial lists are read and parsed while the kernel
//! verifies (both take most of a start, and neither needs the other); nothing waits
//! unparsed in the channel meanwhile.
use std::{collections::HashSet, time::Instant};

use anyhow::{Context, Result};
use tokio::{sync::mpsc::Receiver, task::JoinHandle};

use super::{config::AgentConfig, node::ThisNode, sync_metrics::SyncMetrics};
use crate::{
    model::{IpPrefix, NodeInfo, Translator},
    source::{self, Delta, Resource, Source, SourceEvent, Update},
};

pub(super) struct Intake {
    /// Every object's parsed form and the desired state, kept up to date by `update`.
    pub(super) translator: Translator,
    /// The next sync looks at every frontend (start-up, relist).
    pub(super) full_sync: bool,
    /// This node: its Node object comes through here too.
    pub(super) node: ThisNode,
    /// `--service-cidr`: in force for the files source, and for an API without ServiceCIDRs.
    service_cidr_flag: Vec<IpPrefix>,
    /// The resources listed completely at least once.
    synced: HashSet<Resource>,
    /// When the first change not yet synced arrived.
    pub(super) burst: Option<Instant>,
    /// Whether that burst holds an event worth coalescing (an API update, an address).
    /// The files source's rescans are coalesced already (its quiet period for writes in
    /// place, none for a rename into place), so it syncs at once.
    pub(super) coalesce: bool,
    pub(super) metrics: SyncMetrics,
}

impl Intake {
    pub(super) fn new(source: Source, node: ThisNode, metrics: SyncMetrics, config: &AgentConfig) -> Self {
        let mut translator = Translator::new(NodeInfo { name: node.name.clone(), ..NodeInfo::default() });
        // The files source has no API to lack ServiceCIDRs: the flag always counts, beside
        // the ServiceCIDR objects its files may hold.
        if source == Source::Files {
            translator.set_service_cidr_fallback(config.service_cidrs.iter().copied());
        }
        Intake {
            translator,
            full_sync: true,
            node,
            service_cidr_flag: config.service_cidrs.clone(),
            synced: HashSet::new(),
            burst: None,
            coalesce: false,
            metrics,
        }
    }

    /// Take in the source's events until `loading` is done (the programs verified), and
    /// return what it returned.
    pub(super) async fn until<T>(
        &mut self,
        events: &mut Receiver<SourceEvent>,
        mut loading: JoinHandle<Result<T>>,
    ) -> Result<T> {
        let mut open = true;
        loop {
            tokio::select! {
                loaded = &mut loading => return loaded.context("the thread loading the datapath")?,
                ev = events.recv(), if open => match ev {
                    Some(ev) => self.receive(ev),
                    // The source stopped: the event loop after the load says so.
                    None => open = false,
                },
            }
        }
    }

    /// Every resource listed: the maps can be reconciled against a complete picture.
    pub(super) fn listed(&self) -> bool {
        source::REQUIRED.iter().all(|r| self.synced.contains(r))
    }

    /// One event of the source: a resource fully listed, or a change.
    pub(super) fn receive(&mut self, ev: SourceEvent) {
        // Part of a rescan owes no sync yet: its `Changed` says when all of it is told.
        if !matches!(ev, SourceEvent::Files(_)) {
            self.burst.get_or_insert_with(Instant::now);
        }
        self.coalesce |= matches!(ev, SourceEvent::Update(_));
        match ev {
            SourceEvent::Files(updates) => {
                for u in updates {
                    self.update(u);
                }
            }
            SourceEvent::Synced(r) => {
                self.synced.insert(r);
            }
            SourceEvent::Changed => self.metrics.queued(),
            SourceEvent::Update(u) => {
                self.update(u);
                self.metrics.queued();
            }
        }
    }

    /// One change of an object: parsed into the translation now, applied at the next sync.
    fn update(&mut self, u: Update) {
        self.metrics.changed(&u);
        let t = &mut self.translator;
        match u {
            Update::Services(Delta::Apply(s)) => t.upsert_service(&s),
            Update::Services(Delta::Delete((ns, name))) => t.delete_service(&ns, &name),
            Update::Services(Delta::Relisted(seen)) => {
                t.retain_services(&seen);
                self.full_sync = true;
            }
            Update::Slices(Delta::Apply(s)) => t.upsert_slice(&s),
            Update::Slices(Delta::Delete((ns, name))) => t.delete_slice(&ns, &name),
            Update::Slices(Delta::Relisted(seen)) => {
                t.retain_slices(&seen);
                self.full_sync = true;
            }
            Update::Nodes(Delta::Apply(n)) => self.node.object = Some(n),
            Update::Nodes(Delta::Delete(_)) => self.node.object = None,
            Update::Nodes(Delta::Relisted(seen)) => {
                if seen.is_empty() {
                    self.node.object = None;
                }
            }
            Update::ServiceCidrs(Delta::Apply(c)) => t.upsert_service_cidr(&c),
            Update::ServiceCidrs(Delta::Delete((_, name))) => t.delete_service_cidr(&name),
            Update::ServiceCidrs(Delta::Relisted(seen)) => t.retain_service_cidrs(&seen),
            Update::NoServiceCidrApi => t.set_service_cidr_fallback(self.service_cidr_flag.iter().copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use clap::Parser;
    use tokio::sync::{mpsc::channel, watch};

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use super::*;
    use crate::{
        cli::{Cli, Command},
        health::Health,
        metrics::Metrics,
        model::types::Claims,
    };

    fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("object"))
    }

    /// What the source says while the programs load is parsed as it comes, not queued: when
    /// the load ends, the translation holds the Service and its endpoints, the lists count
    /// as complete, and a sync is owed (the event loop syncs without waiting for another
    /// event).
    fn intake(source: Source) -> Intake {
        let cli = Cli::try_parse_from(["ebpf-proxy", "agent", "--node-name", "n1"]).unwrap();
        let Command::Agent(args) = cli.command else { panic!("not agent") };
        let config = AgentConfig::from_args(&args).unwrap();
        let node = ThisNode::new(&config, Vec::new(), Health::new(Duration::from_secs(60)), watch::channel(vec![]).0);
        Intake::new(source, node, SyncMetrics::new(Metrics::new()), &config)
    }

    fn web() -> (Arc<Service>, Arc<EndpointSlice>) {
        let svc = object(serde_json::json!({
            "metadata": {"name": "web", "namespace": "d"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]}
        }));
        let slice = object(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "d", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": true}}],
            "ports": [{"port": 8080, "protocol": "TCP"}]
        }));
        (svc, slice)
    }

    fn frontends(intake: &mut Intake) -> Vec<String> {
        intake.translator.commit(&Claims::default());
        intake.translator.desired().frontends.keys().map(|k| k.to_string()).collect()
    }

    /// A files rescan is handed on in parts (a file's changes each): each is parsed as it
    /// comes, but a sync is owed only once the rescan's `Changed` says all of it is told
    /// (a Service moved between two files is never synced half-way, gone).
    #[test]
    fn a_rescan_owes_a_sync_only_once_told_whole() {
        let mut intake = intake(Source::Files);
        for r in source::REQUIRED {
            intake.receive(SourceEvent::Synced(r));
        }
        intake.burst = None;
        let (svc, slice) = web();
        intake.receive(SourceEvent::Files(vec![Update::Services(Delta::Apply(svc))]));
        intake.receive(SourceEvent::Files(vec![Update::Slices(Delta::Apply(slice))]));
        assert!(intake.burst.is_none(), "parts of a rescan owe no sync");
        assert_eq!(frontends(&mut intake), ["10.96.0.10:80/TCP"], "but are parsed as they come");
        intake.receive(SourceEvent::Changed);
        assert!(intake.burst.is_some() && !intake.coalesce, "told whole: a sync is owed, at once");
    }

    #[test]
    fn changes_during_the_load_are_taken_in_before_it_ends() {
        let mut intake = intake(Source::Kube);
        let (svc, slice) = web();
        let (tx, mut rx) = channel(8);
        for ev in [
            SourceEvent::Update(Update::Services(Delta::Apply(svc))),
            SourceEvent::Update(Update::Slices(Delta::Apply(slice))),
            SourceEvent::Synced(Resource::Services),
            SourceEvent::Synced(Resource::EndpointSlices),
            SourceEvent::Synced(Resource::Node),
        ] {
            tx.try_send(ev).unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let loaded = rt.block_on(async {
            let loading = tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(7)
            });
            intake.until(&mut rx, loading).await
        });
        assert_eq!(loaded.unwrap(), 7);
        assert!(intake.listed() && intake.burst.is_some() && intake.coalesce);
        assert_eq!(frontends(&mut intake), ["10.96.0.10:80/TCP"]);
        let entry = intake.translator.desired().frontends.values().next().unwrap();
        assert_eq!(entry.backends.len(), 1, "the slice's endpoint is a backend");

        // A load that fails is the caller's error, whatever came meanwhile.
        let failed =
            rt.block_on(async { intake.until::<()>(&mut rx, tokio::spawn(async { anyhow::bail!("verifier") })).await });
        assert!(failed.unwrap_err().to_string().contains("verifier"));
    }
}
