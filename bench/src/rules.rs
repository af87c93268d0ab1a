//! Synthetic service sets and the rule sets kube-proxy would write for them: the iptables
//! `nat` table (one `iptables-restore`) and the nftables `ip kube-proxy` table (one `nft -f`),
//! following kube-proxy's layouts (pkg/proxy/iptables and pkg/proxy/nftables, v1.31+).
//! Only what is on the path of ClusterIP traffic is generated (NAT and masquerade marking);
//! the filter-table checks kube-proxy adds (firewall, no-endpoint rejects) are left out.
use std::{fmt::Write as _, net::Ipv4Addr};

use proxy_userspace::model::{
    BackendAddr, DesiredState, FrontendEntry, FrontendKey, FrontendKind, Protocol, Scope, ServicePortName,
};

/// Cluster CIDR of the pods (kube-proxy's --cluster-cidr: traffic from outside is marked
/// for masquerade).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NAMESPACE: &str = "bench";
pub const PORT_NAME: &str = "http";
pub const SVC_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;

#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// ClusterIP of service `i`: 10.96.0.1, 10.96.0.2, ... (10.96.0.0/12 holds a million).
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Endpoint `j` of service `i` when it is not a real pod: 10.128.0.0/9, unique per service.
pub fn fake_endpoint(i: usize, j: usize, per: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * per + j) as u32)
}

/// `n` services with `per` endpoints each. The last one (the one an iptables scan of
/// KUBE-SERVICES reaches last) gets `last_endpoints` when given: the real pods.
pub fn services(n: usize, per: usize, last_endpoints: Option<&[(Ipv4Addr, u16)]>) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let endpoints = match last_endpoints {
                Some(eps) if i == n - 1 => eps.to_vec(),
                _ => (0..per).map(|j| (fake_endpoint(i, j, per), TARGET_PORT)).collect(),
            };
            Svc { name: format!("svc-{i}"), vip: vip(i), port: SVC_PORT, endpoints }
        })
        .collect()
}

/// The desired state our sync would be given for these services (what `model::translate`
/// produces for them; built directly where the translation is not what is measured).
pub fn desired(svcs: &[Svc]) -> DesiredState {
    svcs.iter().map(|s| (frontend_key(s), frontend_entry(s))).collect()
}

pub fn frontend_key(s: &Svc) -> FrontendKey {
    FrontendKey { addr: s.vip.into(), port: s.port, proto: Protocol::Tcp, scope: Scope::Internal }
}

pub fn frontend_entry(s: &Svc) -> FrontendEntry {
    let mut backends: Vec<BackendAddr> = s
        .endpoints
        .iter()
        .map(|(a, p)| BackendAddr { addr: (*a).into(), port: *p, local: true, terminating: false })
        .collect();
    backends.sort();
    backends.dedup();
    FrontendEntry {
        service: ServicePortName::new(NAMESPACE, &s.name, PORT_NAME),
        kind: FrontendKind::ClusterIP,
        backends,
        affinity_timeout: None,
        local_only: false,
        source_ranges: vec![],
        lb_algorithm: None,
        weights: vec![],
    }
}

/// kube-proxy names chains with the first 16 characters of base32(sha256(...)); any stable
/// 16-character hash has the same shape (FNV-1a here).
fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut h2 = h.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(16);
    for i in 0..16 {
        let src = if i < 12 { &mut h } else { &mut h2 };
        out.push(ALPHABET[(*src & 31) as usize] as char);
        *src >>= 5;
    }
    out
}

fn port_name(s: &Svc) -> String {
    format!("{NAMESPACE}/{}:{PORT_NAME}", s.name)
}

pub fn svc_chain(s: &Svc) -> String {
    format!("KUBE-SVC-{}", hash16(&format!("{}tcp", port_name(s))))
}

pub fn sep_chain(s: &Svc, ep: (Ipv4Addr, u16)) -> String {
    format!("KUBE-SEP-{}", hash16(&format!("{}tcp{}:{}", port_name(s), ep.0, ep.1)))
}

/// Rules of one KUBE-SVC chain and its KUBE-SEP chains (appended to `out`).
fn iptables_service_rules(out: &mut String, s: &Svc) {
    let pn = port_name(s);
    let svc = svc_chain(s);
    let _ = writeln!(
        out,
        "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{pn} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
        s.vip, s.port
    );
    let n = s.endpoints.len();
    for (j, ep) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(s, *ep);
        if j + 1 < n {
            let p = 1.0 / (n - j) as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{pn} -> {}:{}\" -m statistic --mode random --probability {p:.11} -j {sep}",
                ep.0, ep.1
            );
        } else {
            let _ = writeln!(out, "-A {svc} -m comment --comment \"{pn} -> {}:{}\" -j {sep}", ep.0, ep.1);
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let _ = writeln!(out, "-A {sep} -s {}/32 -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ", ep.0);
        let _ = writeln!(
            out,
            "-A {sep} -p tcp -m comment --comment \"{pn}\" -m tcp -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

const IPT_TOP_CHAINS: &str =
    ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";

fn iptables_top_rules(out: &mut String, svcs: &[Svc]) {
    out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    // One rule per service port, in order: the last service is the last one scanned.
    for s in svcs {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j {}",
            s.vip,
            port_name(s),
            s.port,
            svc_chain(s)
        );
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
}

/// The whole `nat` table, for one `iptables-restore`.
pub fn iptables_restore(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 600);
    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    out.push_str(IPT_TOP_CHAINS);
    for s in svcs {
        let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
        for ep in &s.endpoints {
            let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *ep));
        }
    }
    out.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    iptables_top_rules(&mut out, svcs);
    for s in svcs {
        iptables_service_rules(&mut out, s);
    }
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy's partial sync (`iptables-restore --noflush`) writes when one service's
/// endpoints change from `old` to `new` (same name and VIP): the top-level chains in full,
/// the changed service's chains, and the deletion of endpoint chains no longer used.
pub fn iptables_change(svcs: &[Svc], old: &Svc, new: &Svc) -> String {
    let mut out = String::with_capacity(svcs.len() * 200);
    out.push_str("*nat\n");
    out.push_str(IPT_TOP_CHAINS);
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(new));
    let stale: Vec<String> =
        old.endpoints.iter().filter(|e| !new.endpoints.contains(e)).map(|e| sep_chain(old, *e)).collect();
    for ep in &new.endpoints {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(new, *ep));
    }
    for c in &stale {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    iptables_top_rules(&mut out, svcs);
    iptables_service_rules(&mut out, new);
    for c in &stale {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_service_chain(s: &Svc) -> String {
    let id = format!("{NAMESPACE}/{}/tcp/{PORT_NAME}", s.name);
    format!("service-{}-{id}", &hash16(&id)[..8])
}

fn nft_endpoint_chain(s: &Svc, ep: (Ipv4Addr, u16)) -> String {
    let id = format!("{NAMESPACE}/{}/tcp/{PORT_NAME}__{}/{}", s.name, ep.0, ep.1);
    format!("endpoint-{}-{id}", &hash16(&id)[..8])
}

const T: &str = "ip kube-proxy";

fn nft_service(out: &mut String, s: &Svc) {
    let chain = nft_service_chain(s);
    for ep in &s.endpoints {
        let ec = nft_endpoint_chain(s, *ep);
        let _ = writeln!(out, "add chain {T} {ec}");
        let _ = writeln!(out, "flush chain {T} {ec}");
        let _ = writeln!(out, "add rule {T} {ec} ip saddr {} jump mark-for-masquerade", ep.0);
        let _ = writeln!(out, "add rule {T} {ec} meta l4proto tcp dnat to {}:{}", ep.0, ep.1);
    }
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(out, "flush chain {T} {chain}");
    let _ = writeln!(
        out,
        "add rule {T} {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.vip, s.port
    );
    let arms: Vec<String> =
        s.endpoints.iter().enumerate().map(|(j, ep)| format!("{j} : goto {}", nft_endpoint_chain(s, *ep))).collect();
    let _ =
        writeln!(out, "add rule {T} {chain} numgen random mod {} vmap {{ {} }}", s.endpoints.len(), arms.join(" , "));
}

fn nft_header(out: &mut String) {
    let _ = writeln!(out, "add table {T} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(out, "add chain {T} mark-for-masquerade");
    let _ = writeln!(out, "add rule {T} mark-for-masquerade mark set mark or 0x4000");
    let _ = writeln!(out, "add chain {T} masquerading");
    let _ = writeln!(out, "add rule {T} masquerading mark and 0x4000 == 0 return");
    let _ = writeln!(out, "add rule {T} masquerading mark set mark xor 0x4000");
    let _ = writeln!(out, "add rule {T} masquerading masquerade fully-random");
    let _ = writeln!(out, "add chain {T} services");
    let _ = writeln!(out, "add chain {T} nat-prerouting {{ type nat hook prerouting priority -100 ; }}");
    let _ = writeln!(out, "add rule {T} nat-prerouting jump services");
    let _ = writeln!(out, "add chain {T} nat-output {{ type nat hook output priority -100 ; }}");
    let _ = writeln!(out, "add rule {T} nat-output jump services");
    let _ = writeln!(out, "add chain {T} nat-postrouting {{ type nat hook postrouting priority 100 ; }}");
    let _ = writeln!(out, "add rule {T} nat-postrouting jump masquerading");
    let _ = writeln!(
        out,
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(out, "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips");
}

fn nft_services(out: &mut String, svcs: &[Svc]) {
    for s in svcs {
        nft_service(out, s);
    }
    for s in svcs {
        let _ = writeln!(
            out,
            "add element {T} service-ips {{ {} . tcp . {} : goto {} }}",
            s.vip,
            s.port,
            nft_service_chain(s)
        );
    }
}

/// The whole `ip kube-proxy` table as kube-proxy's nftables mode writes it (one transaction).
pub fn nft_ruleset(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 900);
    nft_header(&mut out);
    nft_services(&mut out, svcs);
    out
}

/// The same table in several transactions of `per` services each (same resulting ruleset).
/// A single transaction with many anonymous sets (one `numgen ... vmap` per service) is
/// slower than linear on this kernel and nft; the datapath benchmarks only need the result.
pub fn nft_ruleset_chunks(svcs: &[Svc], per: usize) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut head = String::new();
    nft_header(&mut head);
    chunks.push(head);
    for c in svcs.chunks(per.max(1)) {
        let mut out = String::with_capacity(c.len() * 900);
        nft_services(&mut out, c);
        chunks.push(out);
    }
    chunks
}

/// kube-proxy nftables' incremental transaction when one service's endpoints change.
pub fn nft_change(old: &Svc, new: &Svc) -> String {
    let mut out = String::new();
    nft_service(&mut out, new);
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(out, "delete chain {T} {}", nft_endpoint_chain(old, *ep));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_shapes() {
        let svcs = services(3, 2, Some(&[(Ipv4Addr::new(10, 244, 0, 11), 8080)]));
        assert_eq!(svcs[0].vip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(svcs[2].endpoints.len(), 1);
        let ipt = iptables_restore(&svcs);
        // KUBE-SERVICES: one jump per service, the last service last (before nodeports).
        let jumps: Vec<&str> = ipt.lines().filter(|l| l.starts_with("-A KUBE-SERVICES")).collect();
        assert_eq!(jumps.len(), 4);
        assert!(jumps[2].contains("10.96.0.3/32") && jumps[3].contains("KUBE-NODEPORTS"));
        assert_eq!(ipt.matches("--probability 0.50000000000").count(), 2);
        assert_eq!(ipt.matches("-j DNAT").count(), 5);
        let nft = nft_ruleset(&svcs);
        assert_eq!(nft.matches("add element").count(), 3);
        assert_eq!(nft.matches("numgen random mod 2").count(), 2);
        assert_eq!(nft.matches("dnat to").count(), 5);
        let chunks = nft_ruleset_chunks(&svcs, 2);
        assert_eq!(chunks.len(), 3);
        // The same commands, only the map elements come per chunk.
        let sorted = |t: &str| {
            let mut v: Vec<String> = t.lines().map(String::from).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&chunks.concat()), sorted(&nft));
        assert_eq!(svc_chain(&svcs[0]).len(), "KUBE-SVC-".len() + 16);
        assert_ne!(svc_chain(&svcs[0]), svc_chain(&svcs[1]));
    }
}
