//! Many synthetic Services for scale tests and benchmarks: their objects as the fake API
//! server stores them, and a reader of one frontend's backends straight from the pinned
//! maps (what the datapath would pick from), cheap enough to poll in a tight loop.
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use proxy_common::{PROTO_TCP, SCOPE_INTERNAL, ServiceKey, ServiceValue, SlotKey, port_to_map};
use proxy_userspace::dataplane::{
    maps::Maps,
    maps::addr::{ip_from_map, ip_to_map},
};
use serde_json::{Value, json};

use crate::fake_apiserver::{FakeApiServer, ResourceKind};

pub const NAMESPACE: &str = "scale";
pub const NODE_NAME: &str = "node-a";
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

/// ClusterIP of service `i`: 10.96.0.1 upwards (10.96.0.0/12 holds a million).
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Endpoint `j` of service `i` out of `per`: unique per service, in 10.128.0.0/9.
pub fn endpoint(i: usize, j: usize, per: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * per + j) as u32)
}

/// A replacement endpoint address no initial slice uses (10.250.0.0/16 upwards), `k`-th.
pub fn replacement(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + k as u32)
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

/// ClusterIP Service `i` with one TCP port.
pub fn service(i: usize) -> Value {
    let vip = vip(i).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(i), "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": [vip],
            "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}],
        },
    })
}

/// The one EndpointSlice of service `i`, with ready endpoints at `addrs`.
pub fn slice(i: usize, addrs: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({
                "addresses": [a.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": NODE_NAME,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-abcde", service_name(i)),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service_name(i)},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The initial endpoints of service `i`.
pub fn endpoints(i: usize, per: usize) -> Vec<Ipv4Addr> {
    (0..per).map(|j| endpoint(i, j, per)).collect()
}

/// Loads the agent's Node and `n` Services with `per` endpoints each into `api`.
pub fn load(api: &FakeApiServer, n: usize, per: usize) {
    api.apply_json(
        ResourceKind::Node,
        [json!({
            "metadata": {"name": NODE_NAME},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]},
        })],
    );
    // In chunks, so the server's lock is not held for the whole load.
    for start in (0..n).step_by(1000) {
        let end = (start + 1000).min(n);
        api.apply_json(ResourceKind::Service, (start..end).map(service));
        api.apply_json(ResourceKind::EndpointSlice, (start..end).map(|i| slice(i, &endpoints(i, per))));
    }
}

/// The pinned maps of an agent, read from outside it.
pub struct PinnedServices {
    maps: Maps,
}

impl PinnedServices {
    pub fn open(bpffs_root: &Path) -> Result<Self> {
        Ok(PinnedServices { maps: Maps::open_pinned(bpffs_root).context("opening the pinned maps")? })
    }

    /// The `SERVICES` entry of the internal TCP frontend `vip:port`: one lookup. The agent
    /// switches a frontend to a new backend set by replacing this entry (new slot generation
    /// and count), so a poller can read the backends only when it changed.
    pub fn frontend(&self, vip: Ipv4Addr, port: u16) -> Option<ServiceValue> {
        self.maps.services.get(&key(vip, port), 0).ok()
    }

    /// Backend addresses (sorted) of the internal TCP frontend `vip:port` in its active slot
    /// generation; `None` when the frontend is not in the maps. A read that raced with the
    /// agent switching generations (the service entry changed while its slots were read) is
    /// retried, so the answer is one consistent backend set.
    pub fn backends(&self, vip: Ipv4Addr, port: u16) -> Option<Vec<Ipv4Addr>> {
        let key = key(vip, port);
        // Bounded: a reader that keeps losing the race gives up rather than spin.
        for _ in 0..100 {
            let v = self.maps.services.get(&key, 0).ok()?;
            let read = (0..v.count)
                .map(|i| {
                    let id = self.maps.slots.get(&SlotKey::new(v.id, v.generation, i), 0).ok()?;
                    Some(ip_from_map(self.maps.backends.get(&id, 0).ok()?.addr))
                })
                .collect::<Option<Vec<_>>>();
            if self.maps.services.get(&key, 0).ok()? != v {
                continue;
            }
            if let Some(mut addrs) = read {
                addrs.sort();
                return Some(addrs);
            }
        }
        None
    }
}

fn key(vip: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey { addr: ip_to_map(vip), port: port_to_map(port), proto: PROTO_TCP, scope: SCOPE_INTERNAL }
}
