//! Per-CPU counters: one global array indexed by verdict, one hash keyed by
//! (service id, verdict). Per-CPU so the hot path never contends on a cache line.
use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{Counters, StatsKey};

use crate::maps::{GLOBAL_STATS, SERVICE_STATS};

#[inline(always)]
pub fn count_global(verdict: u32, bytes: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(verdict) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn count_service(svc_id: u32, verdict: u32, bytes: u32) {
    count_global(verdict, bytes);
    let key = StatsKey { svc_id, verdict };
    match SERVICE_STATS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, see above.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        },
        None => {
            // First packet of this (service, verdict) on any CPU: create it. Losing a race
            // with another CPU costs one packet's count, which is fine for counters.
            let _ = SERVICE_STATS.insert(
                &key,
                &Counters { packets: 1, bytes: bytes as u64 },
                BPF_NOEXIST as u64,
            );
        }
    }
}
