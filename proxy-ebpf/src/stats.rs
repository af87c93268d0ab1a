//! Per-CPU counters: one global array indexed by (family, verdict), one hash keyed by
//! (service id, verdict). Per-CPU so the hot path never contends on a cache line. Each
//! program counts once per packet, at its single exit.
use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{Counters, StatsFamily, StatsKey, Verdict};

use crate::maps::{GLOBAL_STATS, SERVICE_STATS};

#[inline(always)]
fn add(c: *mut Counters, bytes: u32) {
    // SAFETY: per-CPU slot, only this CPU writes it while we run.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += bytes as u64;
    }
}

/// Count one packet of `bytes` under `verdict`, node-wide in its `family`'s block and, when
/// it belonged to one (`svc_id` != 0), for its service.
#[inline(always)]
pub fn count(verdict: Verdict, family: StatsFamily, svc_id: u32, bytes: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(family.index(verdict as u32)) {
        add(c, bytes);
    }
    if svc_id == 0 {
        return;
    }
    let key = StatsKey { svc_id, verdict: verdict as u32 };
    match SERVICE_STATS.get_ptr_mut(&key) {
        Some(c) => add(c, bytes),
        None => {
            // First packet of this (service, verdict) on any CPU: create it. Losing a race
            // with another CPU costs one packet's count, which is fine for counters.
            let _ = SERVICE_STATS.insert(&key, &Counters { packets: 1, bytes: bytes as u64 }, BPF_NOEXIST as u64);
        }
    }
}
