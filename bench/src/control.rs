//! Control plane: programming N services x E endpoints from cold (translation of the
//! Kubernetes objects + map writes), one EndpointSlice change at N services, and the time
//! kube-proxy's equivalents take: `iptables-restore` / `nft -f` of the rule sets (whole
//! table cold; for one change, the partial restore kube-proxy's iptables mode does and the
//! incremental transaction of its nftables mode), loaded inside a scratch namespace.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use proxy_tests::{agent::TempDir, netns::Netns};
use proxy_userspace::model::{DesiredState, NodeInfo, Translator, translate};

use crate::{
    Plan, check_interrupted,
    conn::{Finished, NFT_CHUNK, flush_netfilter, load_nft_chunked, load_rules_bounded, run_in},
    dp::Dataplane,
    objects::{self, NODE_NAME},
    percentile,
    report::Row,
    rules::{self, Svc},
};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn p50_p99(rows: &mut Vec<Row>, case: &str, n: usize, mut v: Vec<f64>, note: String) {
    v.sort_by(|a, b| a.total_cmp(b));
    rows.push(Row::new("control", &format!("change.{case}.p50_ms"), Some(n), percentile(&v, 50.0), "ms").note(note));
    rows.push(Row::new("control", &format!("change.{case}.p99_ms"), Some(n), percentile(&v, 99.0), "ms"));
}

pub fn run(plan: &Plan, rows: &mut Vec<Row>) -> Result<()> {
    let scratch = Netns::new("epb-cp-")?;
    let files = TempDir::new("ebpf-proxy-bench-cp-")?;
    let mut sizes = plan.cp_sizes.clone();
    if !sizes.contains(&plan.cp_change_n) {
        sizes.push(plan.cp_change_n);
    }
    for n in sizes {
        check_interrupted()?;
        one_size(plan, n, &scratch, &files, rows).with_context(|| format!("control plane, {n} services"))?;
    }
    Ok(())
}

/// Service `n / 2` with its first endpoint replaced by a new pod (one rollout step).
fn changed_service(svcs: &[Svc]) -> (usize, Svc) {
    let j = svcs.len() / 2;
    let mut new = svcs[j].clone();
    new.endpoints[0].0 = Ipv4Addr::new(10, 250, 0, 1);
    (j, new)
}

fn one_size(plan: &Plan, n: usize, scratch: &Netns, files: &TempDir, rows: &mut Vec<Row>) -> Result<()> {
    let e = plan.cp_endpoints;
    let svcs = rules::services(n, e, None);
    let objs = objects::objects(&svcs)?;
    let node = NodeInfo { name: NODE_NAME.into(), nodeport_addrs: vec![], zone: None };
    let mut dp = Dataplane::load(n, e)?;

    // Cold: first call to last map write.
    let t0 = Instant::now();
    let (desired, warnings) = translate(&objs.services, &objs.slices, &node);
    let t1 = Instant::now();
    let report = dp.syncer.apply(&desired);
    let t2 = Instant::now();
    ensure!(warnings.is_empty(), "translation warnings: {:?}", warnings.first());
    ensure!(desired.frontends.len() == n, "{} frontends translated, wanted {n}", desired.frontends.len());
    ensure!(report.errors.is_empty(), "sync errors: {:?}", report.errors.first());
    ensure!(report.backends == n * e, "{} backends programmed, wanted {}", report.backends, n * e);
    if plan.cp_sizes.contains(&n) {
        let note = format!("{n} services x {e} endpoints, {} map writes into empty maps", report.writes);
        rows.push(
            Row::new("control", "cold.translate_ms", Some(n), ms(t1 - t0), "ms")
                .note("model::translate of the Services + EndpointSlices"),
        );
        rows.push(Row::new("control", "cold.apply_ms", Some(n), ms(t2 - t1), "ms").note(note.clone()));
        rows.push(Row::new("control", "cold.total_ms", Some(n), ms(t2 - t0), "ms").note(note));
    }
    let change = n == plan.cp_change_n;
    if change {
        change_ours(plan, n, &svcs, &objs, &node, &desired, &mut dp, rows)?;
    }
    drop(dp);

    // kube-proxy's rule sets for the same services, loaded into the empty scratch
    // namespace; at the change size the loaded table then takes the one-change updates.
    let (j, new) = changed_service(&svcs);
    let ipt = files.0.join(format!("cold-{n}.iptables"));
    let nft = files.0.join(format!("cold-{n}.nft"));
    let ipt_text = rules::iptables_restore(&svcs);
    let ipt_rules = ipt_text.lines().filter(|l| l.starts_with("-A")).count();
    std::fs::write(&ipt, &ipt_text)?;
    drop(ipt_text);
    for (case, row) in [
        ("iptables_legacy", "cold.iptables_legacy_restore_ms"),
        ("iptables", "cold.iptables_restore_ms"),
        ("nftables_chunked", "cold.nft_chunked_ms"),
        ("nftables", "cold.nft_ms"),
    ] {
        check_interrupted()?;
        let what = match case {
            "nftables" => format!("{} chains, one nft -f transaction (as kube-proxy does)", 7 + n * (1 + e)),
            "nftables_chunked" => {
                format!("{} chains, nft -f transactions of {NFT_CHUNK} services each", 7 + n * (1 + e))
            }
            _ => format!("{ipt_rules} rules in {} chains, one iptables-restore", n * (1 + e) + 4),
        };
        let outcome = match case {
            "nftables_chunked" => {
                Finished::Done(load_nft_chunked(scratch, &files.0, &svcs, NFT_CHUNK, plan.cp_rule_timeout)?)
            }
            "nftables" => {
                std::fs::write(&nft, rules::nft_ruleset(&svcs))?;
                load_rules_bounded(scratch, case, &nft, plan.cp_rule_timeout)?
            }
            _ => load_rules_bounded(scratch, case, &ipt, plan.cp_rule_timeout)?,
        };
        let loaded = matches!(outcome, Finished::Done(_));
        if plan.cp_sizes.contains(&n) {
            let row = match outcome {
                Finished::Done(d) => {
                    Row::new("control", row, Some(n), ms(d), "ms").note(format!("{what}; process wall time"))
                }
                Finished::TimedOut(d) => Row::new("control", row, Some(n), ms(d), "ms").note(format!(
                    "{what}; NOT FINISHED: killed at the {:?} bound, so this is a lower bound",
                    plan.cp_rule_timeout
                )),
            };
            rows.push(row);
        }
        let flush_as = if case == "nftables_chunked" { "nftables" } else { case };
        if change && loaded && (case == "iptables" || case == "nftables_chunked") {
            change_rules(plan, n, flush_as, &svcs, j, &new, scratch, files, rows)?;
        }
        flush_netfilter(scratch, flush_as)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn change_ours(
    plan: &Plan,
    n: usize,
    svcs: &[Svc],
    objs: &proxy_userspace::source::Objects,
    node: &NodeInfo,
    desired: &DesiredState,
    dp: &mut Dataplane,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (j, new) = changed_service(svcs);
    let old = &svcs[j];
    let new_ip = new.endpoints[0].0;
    let mut changed = desired.clone();
    {
        let entry = std::sync::Arc::make_mut(
            changed.frontends.get_mut(&rules::frontend_key(old)).context("changed service not in desired state")?,
        );
        let b = entry.backends.iter_mut().find(|b| b.addr == old.endpoints[0].0).context("endpoint")?;
        b.addr = new_ip.into();
        entry.backends.sort();
    }
    let reps = plan.cp_change_reps;

    // Apply only: the new desired state handed to the sync.
    let mut lat = Vec::with_capacity(reps);
    let mut writes = 0;
    // Whether the maps hold `changed` (every run switches).
    let mut at_changed = false;
    for i in 0..reps {
        check_interrupted()?;
        at_changed = !at_changed;
        let d = if at_changed { &changed } else { desired };
        let t = Instant::now();
        let r = dp.syncer.apply(d);
        lat.push(ms(t.elapsed()));
        ensure!(r.errors.is_empty() && r.writes > 0, "change {i}: {} writes, errors {:?}", r.writes, r.errors.first());
        writes += r.writes;
    }
    p50_p99(rows, "apply", n, lat, format!("{reps} runs, {:.1} map writes each", writes as f64 / reps as f64));

    // Translate everything + apply: what the agent's sync loop does per event burst.
    let mut slices_b = objs.slices.clone();
    let slice = slices_b
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some(objects::slice_name(old).as_str()))
        .map(std::sync::Arc::make_mut)
        .context("slice of the changed service")?;
    slice.endpoints.as_mut().and_then(|e| e.first_mut()).context("slice endpoints")?.addresses =
        vec![new_ip.to_string()];
    let mut lat = Vec::with_capacity(reps);
    for i in 0..reps {
        check_interrupted()?;
        at_changed = !at_changed;
        let slices = if at_changed { &slices_b } else { &objs.slices };
        let t = Instant::now();
        let (d, _) = translate(&objs.services, slices, node);
        let r = dp.syncer.apply(&d);
        lat.push(ms(t.elapsed()));
        ensure!(r.errors.is_empty() && r.writes > 0, "change {i}: {} writes", r.writes);
    }
    p50_p99(rows, "translate_apply", n, lat, format!("{reps} runs"));

    // What the agent does now: the changed slice into the translator, re-translate what it
    // touches, write the frontends whose entry changed.
    let mut translator = Translator::new(node.clone());
    translator.replace_services(&objs.services);
    translator.replace_slices(if at_changed { &slices_b } else { &objs.slices });
    translator.commit(&dp.syncer);
    // `slices_b` is `objs.slices` with that one slice changed, in the same order.
    let name = objects::slice_name(old);
    let at = objs.slices.iter().position(|s| s.metadata.name.as_deref() == Some(name.as_str())).context("slice")?;
    let (slice_a, slice_b) = (objs.slices[at].clone(), slices_b[at].clone());
    let mut lat = Vec::with_capacity(reps);
    for i in 0..reps {
        check_interrupted()?;
        at_changed = !at_changed;
        let s = if at_changed { &slice_b } else { &slice_a };
        let t = Instant::now();
        translator.upsert_slice(s);
        let changed = translator.commit(&dp.syncer);
        let r = dp.syncer.apply_changes(translator.desired(), &changed);
        lat.push(ms(t.elapsed()));
        ensure!(r.errors.is_empty() && r.writes > 0, "change {i}: {} writes", r.writes);
    }
    p50_p99(rows, "incremental", n, lat, format!("{reps} runs: Translator::upsert_slice + commit + apply_changes"));
    Ok(())
}

/// One-change updates against the full table already loaded in `scratch`, alternating
/// between the new endpoint and back: kube-proxy iptables' partial `iptables-restore
/// --noflush`, or kube-proxy nftables' incremental `nft -f` transaction.
#[allow(clippy::too_many_arguments)]
fn change_rules(
    plan: &Plan,
    n: usize,
    case: &str,
    svcs: &[Svc],
    j: usize,
    new: &Svc,
    scratch: &Netns,
    files: &TempDir,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let old = &svcs[j];
    let (to_new, to_old, row): (PathBuf, PathBuf, &str) = if case == "nftables" {
        let (a, b) = (files.0.join("change-a.nft"), files.0.join("change-b.nft"));
        std::fs::write(&a, rules::nft_change(old, new))?;
        std::fs::write(&b, rules::nft_change(new, old))?;
        (a, b, "nft")
    } else {
        let (a, b) = (files.0.join("change-a.iptables"), files.0.join("change-b.iptables"));
        std::fs::write(&a, rules::iptables_change(svcs, old, new))?;
        std::fs::write(&b, rules::iptables_change(svcs, new, old))?;
        (a, b, "iptables_restore")
    };
    let mut lat = Vec::new();
    let start = Instant::now();
    while lat.len() < plan.cp_rule_change_reps && (lat.is_empty() || start.elapsed() < plan.cp_rule_budget) {
        check_interrupted()?;
        let f = if lat.len() % 2 == 0 { &to_new } else { &to_old };
        let f = f.to_str().context("path")?;
        let took = if case == "nftables" {
            run_in(scratch, "nft", &["-f", f], None, plan.cp_rule_timeout)?
        } else {
            run_in(
                scratch,
                "iptables-restore",
                &["-w", "--noflush"],
                Some(std::path::Path::new(f)),
                plan.cp_rule_timeout,
            )?
        };
        lat.push(ms(took));
    }
    let note = format!("{} runs (bounded by {} or {:?})", lat.len(), plan.cp_rule_change_reps, plan.cp_rule_budget);
    p50_p99(rows, row, n, lat, note);
    Ok(())
}
