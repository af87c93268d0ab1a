//! `ebpf-proxy cleanup --kube-proxy` in a network namespace holding kube-proxy's rules in
//! every place kube-proxy writes them: the bench's generator of kube-proxy's iptables
//! layout loaded through iptables-legacy and iptables-nft, an IPv6 layout in both, the
//! nftables mode's `ip kube-proxy` table (the bench's generator) and an `ip6 kube-proxy`
//! one; next to them, rules and tables of others (a masquerade rule, a CNI chain, the
//! kubelet's KUBE-FIREWALL, an `inet` table) that must survive. A second run is a no-op,
//! and a node without the tools is skipped, not failed.
use std::{
    io::Write,
    process::{Command, Stdio},
};

use proxy_bench::rules;
use proxy_tests::{agent::ebpf_proxy_bin, harness::require_root, netns::Netns};

/// `program args` inside `ns` (nsenter: the network namespace only), with `input` on
/// stdin: (success, stdout, stderr).
fn run_in(
    ns: &Netns,
    program: &str,
    args: &[&str],
    input: Option<&str>,
    env_path: Option<&str>,
) -> (bool, String, String) {
    // By absolute path: `env_path` changes where the child looks for programs.
    let mut cmd = Command::new("/usr/bin/nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", ns.name)).arg(program).args(args);
    if let Some(p) = env_path {
        cmd.env("PATH", p);
    }
    let mut child = cmd
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(ns: &Netns, program: &str, args: &[&str], input: Option<&str>) -> String {
    let (good, out, err) = run_in(ns, program, args, input, None);
    assert!(good, "{program} {args:?}: {err}");
    out
}

/// Others' rules: a masquerade rule, a CNI chain with a rule, an INPUT accept, and the
/// kubelet's KUBE-FIREWALL (kube-proxy's cleanup leaves it; so must ours).
const FOREIGN_V4: &str = "*nat
:CNI-NAT - [0:0]
-A POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -j MASQUERADE
-A CNI-NAT -d 10.88.0.0/16 -j ACCEPT
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL -m comment --comment \"kubelet firewall\" -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
";

const FOREIGN_V6: &str = "*nat
:CNI-NAT - [0:0]
-A POSTROUTING -s fd00:88::/64 -j MASQUERADE
-A CNI-NAT -d fd00:88::/64 -j ACCEPT
COMMIT
";

/// kube-proxy's IPv6 layout (the same shape as IPv4's; the bench generates IPv4 only), with
/// the filter table's chains too.
const KUBE_V6: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-QRSTUVWXYZ234567 - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-SERVICES -d fd00:96::1/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SVC-ABCDEFGHIJKLMNOP -j KUBE-SEP-QRSTUVWXYZ234567
-A KUBE-SEP-QRSTUVWXYZ234567 -p tcp -m tcp -j DNAT --to-destination [fd00:244::5]:8080
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
";

/// kube-proxy's filter-table chains in IPv4 (the bench writes only `nat`).
const KUBE_V4_FILTER: &str = "*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
";

const KUBE_NFT_V6: &str = "add table ip6 kube-proxy { comment \"rules for kube-proxy\" ; }
add chain ip6 kube-proxy services
add chain ip6 kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip6 kube-proxy nat-prerouting jump services
";

const FOREIGN_NFT: &str = "add table inet foreign
add chain inet foreign input { type filter hook input priority 0 ; }
add rule inet foreign input tcp dport 22 accept
add table ip kube-proxy-not
";

/// Per backend of each family: the save tool and its output.
const SAVES: [&str; 4] = ["iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"];

fn saves(ns: &Netns) -> Vec<(&'static str, String)> {
    SAVES.iter().map(|s| (*s, ok(ns, s, &[], None))).collect()
}

/// Rule and chain lines, without comments and counters (they vary between runs).
fn lines(save: &str) -> Vec<String> {
    save.lines().filter(|l| !l.starts_with('#')).map(|l| l.split(" [").next().unwrap_or(l).to_string()).collect()
}

fn nft_tables(ns: &Netns) -> String {
    ok(ns, "nft", &["list", "tables"], None)
}

#[test]
#[ignore = "needs root (network namespaces, iptables, nftables): run by `cargo xtask test` as root"]
fn cleanup_kube_proxy_removes_its_rules_and_only_its() {
    require_root("cleanup_kube_proxy_removes_its_rules_and_only_its");
    let ns = Netns::new("epk-").expect("netns");
    let svcs = rules::services(20, 3, None);
    let nat = rules::iptables_restore(&svcs);
    for restore in ["iptables-legacy-restore", "iptables-nft-restore"] {
        ok(&ns, restore, &[], Some(&nat));
        ok(&ns, restore, &["--noflush"], Some(KUBE_V4_FILTER));
        ok(&ns, restore, &["--noflush"], Some(FOREIGN_V4));
    }
    for restore in ["ip6tables-legacy-restore", "ip6tables-nft-restore"] {
        ok(&ns, restore, &[], Some(KUBE_V6));
        ok(&ns, restore, &["--noflush"], Some(FOREIGN_V6));
    }
    for chunk in rules::nft_ruleset_chunks(&svcs, 10) {
        ok(&ns, "nft", &["-f", "-"], Some(&chunk));
    }
    ok(&ns, "nft", &["-f", "-"], Some(KUBE_NFT_V6));
    ok(&ns, "nft", &["-f", "-"], Some(FOREIGN_NFT));
    let before = saves(&ns);
    for (tool, s) in &before {
        assert!(s.contains("-j KUBE-SERVICES") && s.contains(":KUBE-SVC-"), "{tool} not loaded:\n{s}");
    }
    assert!(nft_tables(&ns).contains("table ip kube-proxy\n") && nft_tables(&ns).contains("table ip6 kube-proxy"));

    let bin = ebpf_proxy_bin().expect("ebpf-proxy");
    let bin = bin.to_str().unwrap();
    let (good, out, err) = run_in(&ns, bin, &["cleanup", "--kube-proxy"], None, None);
    eprintln!("cleanup --kube-proxy said:\n{out}{err}");
    assert!(good, "{out}{err}");
    for tool in
        ["iptables-legacy (IPv4) table nat", "ip6tables-nft (IPv6) table filter", "nftables table ip6 kube-proxy"]
    {
        assert!(out.contains(tool), "{tool}: {out}");
    }

    let after = saves(&ns);
    for ((tool, b), (_, a)) in before.iter().zip(&after) {
        // Nothing of kube-proxy's: every KUBE-* chain and jump left is the kubelet's.
        let kube: Vec<&str> = a.lines().filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL")).collect();
        assert!(kube.is_empty(), "{tool} keeps kube-proxy's {kube:#?}");
        // Everything else is as it was.
        let keep: Vec<String> =
            lines(b).into_iter().filter(|l| !l.contains("KUBE-") || l.contains("KUBE-FIREWALL")).collect();
        assert_eq!(lines(a), keep, "{tool}: others' rules changed");
    }
    let v4 = &after[0].1;
    assert!(v4.contains("-A POSTROUTING -s 10.88.0.0/16 ! -d 10.88.0.0/16 -j MASQUERADE"), "{v4}");
    assert!(v4.contains("-A INPUT -j KUBE-FIREWALL") && v4.contains("-A CNI-NAT -d 10.88.0.0/16 -j ACCEPT"), "{v4}");
    let tables = nft_tables(&ns);
    assert!(!tables.contains("table ip kube-proxy\n") && !tables.contains("table ip6 kube-proxy"), "{tables}");
    assert!(tables.contains("table inet foreign") && tables.contains("table ip kube-proxy-not"), "{tables}");

    // Again: nothing left to do, nothing changes. (Through the node's tools run chrooted
    // into a host root, as the uninstall DaemonSet does: here the host root is `/`.)
    let (good, out, err) = run_in(&ns, bin, &["cleanup", "--kube-proxy", "--host-root", "/"], None, None);
    assert!(good && out.contains("nothing of kube-proxy's found") && !out.contains("skipped"), "{out}{err}");
    assert_eq!(
        saves(&ns).iter().map(|(_, s)| lines(s)).collect::<Vec<_>>(),
        after.iter().map(|(_, s)| lines(s)).collect::<Vec<_>>()
    );
    assert_eq!(nft_tables(&ns), tables);

    // A node without the tools: each is skipped with a line saying so, and it succeeds.
    let empty = std::env::temp_dir().join(format!("ebpf-proxy-no-tools-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let (good, out, err) = run_in(&ns, bin, &["cleanup", "--kube-proxy"], None, Some(empty.to_str().unwrap()));
    let _ = std::fs::remove_dir(&empty);
    assert!(good, "{out}{err}");
    for tool in ["iptables (IPv4)", "ip6tables (IPv6)", "nftables: nft not installed"] {
        assert!(out.contains(&format!("skipped {tool}")), "{tool}: {out}");
    }
}
