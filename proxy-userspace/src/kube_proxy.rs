//! `ebpf-proxy cleanup --kube-proxy`: remove what kube-proxy leaves on a node, as
//! `kube-proxy --cleanup` does (upstream `pkg/proxy/iptables` `CleanupLeftovers` and
//! `pkg/proxy/nftables`), only when asked:
//!
//! - iptables, IPv4 and IPv6, in both backends (legacy and nft, each through its own
//!   `*-save`/`*-restore`): kube-proxy's chains, flushed and deleted, and every rule
//!   elsewhere that jumps to one of them (the jumps from the built-in chains: PREROUTING,
//!   OUTPUT, POSTROUTING, INPUT, FORWARD). kube-proxy's chains are, in `nat`: KUBE-SERVICES,
//!   KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ, KUBE-PROXY-CANARY and the per-service
//!   chains (KUBE-SVC-, KUBE-SVL-, KUBE-EXT-, KUBE-FW-, KUBE-SEP-, KUBE-XLB-); in `filter`:
//!   KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-FORWARD, KUBE-NODEPORTS,
//!   KUBE-PROXY-FIREWALL, KUBE-PROXY-CANARY; in `mangle`: KUBE-PROXY-CANARY. The kubelet's
//!   own KUBE-* chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-MARK-DROP) stay, as
//!   kube-proxy leaves them.
//! - nftables: the tables `ip kube-proxy` and `ip6 kube-proxy`.
//! - IPVS (virtual servers, the `kube-ipvs0` device, KUBE-* ipsets) is not handled.
//!
//! Like kube-proxy itself, this runs the node's tools (`iptables-save`, `iptables-restore
//! --noflush`, `nft`) rather than speaking their netlink protocols: the iptables-nft rule
//! encoding is private to those tools. Each table is rewritten in one restore transaction.
//! A tool that is not installed is skipped with a line saying so, never an error. Rules and
//! chains that are not kube-proxy's are left alone. A second run finds nothing.
//!
//! The agent's image has none of those tools: in a pod, `--host-root` names where the
//! node's root filesystem is mounted, and the node's own tools run chrooted into it (so
//! they also match the node's kernel and iptables backend).
use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use tracing::info;

/// kube-proxy's per-service chain prefixes (`isServiceChainName`; KUBE-XLB- from before 1.24).
const SERVICE_CHAIN_PREFIXES: [&str; 6] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"];

/// Whether `chain` of `table` is one kube-proxy creates (and its cleanup deletes).
pub fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    match table {
        "nat" => {
            matches!(
                chain,
                "KUBE-SERVICES" | "KUBE-NODEPORTS" | "KUBE-POSTROUTING" | "KUBE-MARK-MASQ" | "KUBE-PROXY-CANARY"
            ) || SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
        }
        "filter" => matches!(
            chain,
            "KUBE-SERVICES"
                | "KUBE-EXTERNAL-SERVICES"
                | "KUBE-FORWARD"
                | "KUBE-NODEPORTS"
                | "KUBE-PROXY-FIREWALL"
                | "KUBE-PROXY-CANARY"
        ),
        "mangle" => chain == "KUBE-PROXY-CANARY",
        _ => false,
    }
}

/// Split one `iptables-save` rule line into words, keeping double-quoted strings (comments)
/// whole, so a comment mentioning `-j KUBE-...` is not taken for a target.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// What to do in one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    /// kube-proxy's chains present in the table: flushed, then deleted.
    pub chains: Vec<String>,
    /// Rules outside those chains that jump to one of them, as `iptables-save` wrote them
    /// (`-A CHAIN ...`).
    pub jumps: Vec<String>,
}

impl TablePlan {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// The `iptables-restore --noflush` input: declaring a chain flushes it, `-D` deletes a
    /// jump by its exact spec, `-X` deletes a chain (once nothing refers to it).
    fn restore_input(&self, out: &mut String) {
        let _ = writeln!(out, "*{}", self.table);
        for c in &self.chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for j in &self.jumps {
            let _ = writeln!(out, "-D {}", &j[3..]);
        }
        for c in &self.chains {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");
    }
}

/// The rules of `plan`'s table (outside kube-proxy's chains) that jump to one of them.
fn add_jumps(plan: &mut TablePlan, rules: &mut Vec<&str>) {
    for r in rules.drain(..) {
        let w = words(r);
        let chain = w.get(1).map(String::as_str).unwrap_or_default();
        if is_kube_proxy_chain(&plan.table, chain) {
            continue;
        }
        let target = w.windows(2).find(|p| p[0] == "-j" || p[0] == "-g").map(|p| p[1].as_str());
        if target.is_some_and(|t| is_kube_proxy_chain(&plan.table, t)) {
            plan.jumps.push(r.to_string());
        }
    }
}

/// Plan every table of one `iptables-save` output (only the tables the kernel has are in
/// it: saving without `-t` never loads a table module).
pub fn plan(save: &str) -> Vec<TablePlan> {
    let mut plans: Vec<TablePlan> = Vec::new();
    // Rules of the current table, judged once its chains are all known.
    let mut rules: Vec<&str> = Vec::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            plans.push(TablePlan { table: t.trim().to_string(), ..Default::default() });
        } else if let Some(plan) = plans.last_mut() {
            if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split_whitespace().next().unwrap_or_default();
                if is_kube_proxy_chain(&plan.table, chain) {
                    plan.chains.push(chain.to_string());
                }
            } else if line.starts_with("-A ") {
                rules.push(line);
            } else if line.trim() == "COMMIT" {
                add_jumps(plan, &mut rules);
            }
        }
    }
    plans.retain(|p| !p.is_empty());
    plans
}

/// One iptables backend of one family: its save and restore tools.
struct Backend {
    label: &'static str,
    save: &'static str,
    restore: &'static str,
}

/// Per family: the legacy and nft tools; the plain names when neither is installed (then
/// they are whichever backend the node uses).
const FAMILIES: [(&str, [Backend; 3]); 2] = [
    (
        "IPv4",
        [
            Backend { label: "iptables-legacy", save: "iptables-legacy-save", restore: "iptables-legacy-restore" },
            Backend { label: "iptables-nft", save: "iptables-nft-save", restore: "iptables-nft-restore" },
            Backend { label: "iptables", save: "iptables-save", restore: "iptables-restore" },
        ],
    ),
    (
        "IPv6",
        [
            Backend { label: "ip6tables-legacy", save: "ip6tables-legacy-save", restore: "ip6tables-legacy-restore" },
            Backend { label: "ip6tables-nft", save: "ip6tables-nft-save", restore: "ip6tables-nft-restore" },
            Backend { label: "ip6tables", save: "ip6tables-save", restore: "ip6tables-restore" },
        ],
    ),
];

/// What was removed, what was skipped (a tool not installed) and what failed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct KubeProxyReport {
    pub removed: Vec<String>,
    pub skipped: Vec<String>,
    pub errors: Vec<String>,
}

impl KubeProxyReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.removed {
            let _ = writeln!(out, "removed {r}");
        }
        for s in &self.skipped {
            let _ = writeln!(out, "skipped {s}");
        }
        for e in &self.errors {
            let _ = writeln!(out, "error: {e}");
        }
        if self.removed.is_empty() && self.errors.is_empty() {
            out.push_str(
                "nothing of kube-proxy's found: no KUBE-* chains of kube-proxy, no kube-proxy nftables tables",
            );
            out.push_str(if self.skipped.is_empty() { "\n" } else { " (where a tool was there to look)\n" });
        }
        out
    }
}

/// Searched when PATH is not set at all, and on the host under `--host-root`.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the tools come from: this filesystem (PATH), or the node's, mounted at a host root
/// and run chrooted into it.
#[derive(Clone, Debug, Default)]
pub struct Tools {
    pub host_root: Option<PathBuf>,
}

impl Tools {
    /// The executable `name`, as the path to run it by (inside the host root, if any).
    fn find(&self, name: &str) -> Option<PathBuf> {
        match &self.host_root {
            None => {
                let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
                std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
            }
            Some(root) => std::env::split_paths(DEFAULT_PATH)
                .map(|d| d.join(name))
                .find(|p| is_executable(&root.join(p.strip_prefix("/").unwrap_or(p)))),
        }
    }

    fn command(&self, program: &Path) -> Result<Command, String> {
        let mut cmd = Command::new(program);
        if let Some(root) = &self.host_root {
            use std::os::unix::{ffi::OsStrExt, process::CommandExt};
            let c = std::ffi::CString::new(root.as_os_str().as_bytes())
                .map_err(|_| format!("--host-root {}: contains NUL", root.display()))?;
            // SAFETY: between fork and exec only async-signal-safe calls (chroot, chdir) on
            // buffers prepared before the fork; nothing is allocated or locked.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::chroot(c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    /// Run `program` with `input` on stdin: its stdout, or an error naming it with its
    /// stderr.
    fn run(&self, program: &Path, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let name = program.display();
        let mut child = self
            .command(program)?
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {name}: {e}"))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).map_err(|e| format!("writing to {name}: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("running {name}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{name} {}: {} ({})",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn summary(p: &TablePlan) -> String {
    const SHOWN: usize = 4;
    let mut names: Vec<&str> = p.chains.iter().map(String::as_str).take(SHOWN).collect();
    if p.chains.len() > SHOWN {
        names.push("...");
    }
    format!("{} chain(s) ({}) and {} jump(s) to them", p.chains.len(), names.join(", "), p.jumps.len())
}

fn clean_iptables(tools: &Tools, family: &str, b: &Backend, report: &mut KubeProxyReport) {
    let (Some(save), Some(restore)) = (tools.find(b.save), tools.find(b.restore)) else {
        return report.skipped.push(format!("{} ({family}): {} or {} not installed", b.label, b.save, b.restore));
    };
    let saved = match tools.run(&save, &[], None) {
        Ok(s) => s,
        Err(e) => return report.errors.push(e),
    };
    let plans = plan(&saved);
    if plans.is_empty() {
        return;
    }
    let mut input = String::new();
    for p in &plans {
        p.restore_input(&mut input);
    }
    // --wait: legacy iptables serialises writers on the xtables lock (kubelet may hold it).
    match tools.run(&restore, &["--noflush", "--wait=10"], Some(&input)) {
        Ok(_) => {
            for p in &plans {
                let line = format!("{} ({family}) table {}: {}", b.label, p.table, summary(p));
                info!(backend = b.label, family, table = %p.table, chains = p.chains.len(), jumps = p.jumps.len(), "removed kube-proxy's iptables chains");
                report.removed.push(line);
            }
        }
        Err(e) => report.errors.push(e),
    }
}

/// The nftables tables kube-proxy's nftables mode writes.
const NFT_TABLES: [(&str, &str); 2] = [("ip", "kube-proxy"), ("ip6", "kube-proxy")];

fn clean_nftables(tools: &Tools, report: &mut KubeProxyReport) {
    let Some(nft) = tools.find("nft") else {
        return report.skipped.push("nftables: nft not installed".to_string());
    };
    let tables = match tools.run(&nft, &["list", "tables"], None) {
        Ok(t) => t,
        Err(e) => return report.errors.push(e),
    };
    for (family, name) in NFT_TABLES {
        let present = tables.lines().any(|l| l.split_whitespace().eq(["table", family, name]));
        if !present {
            continue;
        }
        match tools.run(&nft, &["delete", "table", family, name], None) {
            Ok(_) => {
                info!(family, table = name, "removed kube-proxy's nftables table");
                report.removed.push(format!("nftables table {family} {name}"));
            }
            Err(e) => report.errors.push(e),
        }
    }
}

/// Remove kube-proxy's leftovers from the caller's network namespace.
pub fn cleanup(tools: &Tools) -> KubeProxyReport {
    let mut report = KubeProxyReport::default();
    for (family, backends) in &FAMILIES {
        let [legacy, nft, plain] = backends;
        let have_variants = [legacy, nft].iter().any(|b| tools.find(b.save).is_some());
        if have_variants {
            clean_iptables(tools, family, legacy, &mut report);
            clean_iptables(tools, family, nft, &mut report);
        } else {
            // Only the plain names: one backend, whichever the node's tools use.
            clean_iptables(tools, family, plain, &mut report);
        }
    }
    clean_nftables(tools, &mut report);
    for s in &report.skipped {
        info!(what = %s, "skipped");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = r#"# Generated by iptables-save
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-NAT - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-BBBBBBBBBBBBBBBB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m comment --comment "not a jump: -j KUBE-SERVICES" -j CNI-NAT
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE
-A CNI-NAT -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-BBBBBBBBBBBBBBBB
-A KUBE-SVC-BBBBBBBBBBBBBBBB -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p tcp -j DNAT --to-destination 10.244.0.5:8080
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
COMMIT
"#;

    #[test]
    fn plans_kube_proxys_chains_and_the_jumps_to_them() {
        let plans = plan(SAVED);
        let by_table = |t: &str| plans.iter().find(|p| p.table == t).unwrap();
        assert_eq!(by_table("mangle").chains, ["KUBE-PROXY-CANARY"]);
        let nat = by_table("nat");
        assert_eq!(
            nat.chains,
            [
                "KUBE-MARK-MASQ",
                "KUBE-POSTROUTING",
                "KUBE-SEP-AAAAAAAAAAAAAAAA",
                "KUBE-SERVICES",
                "KUBE-SVC-BBBBBBBBBBBBBBBB"
            ]
        );
        // The kubelet's KUBE-MARK-DROP stays; a comment naming a KUBE chain is no jump; a
        // foreign chain's jump into ours must go too, or the chain could not be deleted.
        assert_eq!(
            nat.jumps,
            [
                r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
                r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
                r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#,
                "-A CNI-NAT -j KUBE-MARK-MASQ",
            ]
        );
        let filter = by_table("filter");
        assert_eq!(filter.chains, ["KUBE-FORWARD"]);
        assert_eq!(filter.jumps.len(), 1);
        let mut input = String::new();
        filter.restore_input(&mut input);
        assert_eq!(
            input,
            "*filter\n:KUBE-FORWARD - [0:0]\n-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n-X KUBE-FORWARD\nCOMMIT\n"
        );
    }

    #[test]
    fn nothing_to_do_on_a_clean_node() {
        let clean = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-MARK-DROP - [0:0]\n-A PREROUTING -j ACCEPT\nCOMMIT\n";
        assert_eq!(plan(clean), vec![]);
        assert_eq!(plan(""), vec![]);
    }

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a \"b\" -j C" -j D"#),
            ["-A", "X", "-m", "comment", "--comment", r#"a "b" -j C"#, "-j", "D"]
        );
    }
}
