//! What this node's kernel gives the datapath, probed once at start-up, before anything is
//! loaded: logged as one line, and checked against the configuration so that the agent
//! refuses what it cannot honour instead of running without it. Only what the code branches
//! on, or cannot run without, is probed:
//!
//! - the XDP program calls `bpf_xdp_get_buff_len` (multi-buffer frames, Linux >= 5.18) and
//!   the uplink's TC hand-off `bpf_redirect_neigh` (5.10): without them nothing loads;
//! - XDP metadata (`bpf_xdp_adjust_meta`), which the XDP program uses to hand packets for a
//!   tunnel device to the uplink's TC ingress: some kernels refuse it to XDP, and then the
//!   loader turns the hand-off off (a warning says what that costs) instead of failing;
//! - socket-level load balancing needs a cgroup v2 hierarchy and cgroup `sock_addr`
//!   programs with `bpf_set_retval` (5.18);
//! - tcx (6.6) makes attachments bpf_links that survive restarts and that the datapath
//!   check can see; without it, clsact filters;
//! - BTF (`/sys/kernel/btf/vmlinux`) is reported for support requests (the object carries
//!   no CO-RE relocations, so nothing depends on it);
//! - the uplinks' drivers decide native or generic XDP (attached and logged per uplink;
//!   the `--uplink` ones are named here).
use std::path::PathBuf;

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported},
};

use crate::dataplane::{attach::ifaces, kernel::bpfsys, maps::loader, sock};

/// The probes' results. `None`: the probe itself failed (then nothing is refused on it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `/proc/sys/kernel/osrelease`.
    pub release: String,
    pub xdp_multi_buffer: Option<bool>,
    pub redirect_neigh: Option<bool>,
    pub xdp_metadata: bool,
    pub sock_addr_set_retval: Option<bool>,
    pub tcx: bool,
    pub btf: bool,
    /// The node's cgroup v2 root, if one is mounted.
    pub cgroup2: Option<PathBuf>,
    /// Drivers of the `--uplink` interfaces (detected uplinks are logged as they attach).
    pub uplink_drivers: Vec<(String, String)>,
}

/// A configuration this kernel cannot honour, or a kernel the datapath cannot run on.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error(
        "kernel {release} lacks {helper} ({what}): ebpf-proxy needs Linux >= 5.18 (see docs/deploy.md, \"Compatibility\")"
    )]
    Kernel { release: String, helper: &'static str, what: &'static str },
    #[error(
        "--socket-lb={mode}: {why}; run with --socket-lb=off (the TC and XDP paths still serve pods and \
         north-south traffic; node processes and hostNetwork pods then cannot reach Services)"
    )]
    SocketLb { mode: &'static str, why: String },
}

fn helper(program: ProgramType, helper: BpfHelper) -> Option<bool> {
    is_helper_supported(program, helper).ok()
}

impl KernelFeatures {
    /// Probe this kernel (loads and unloads a few two-instruction programs).
    pub fn probe(uplinks: &[String]) -> Self {
        KernelFeatures {
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            xdp_multi_buffer: helper(ProgramType::Xdp, BpfHelper::BPF_FUNC_xdp_get_buff_len),
            redirect_neigh: helper(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_redirect_neigh),
            xdp_metadata: loader::xdp_metadata_supported(),
            sock_addr_set_retval: helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval),
            tcx: bpfsys::tcx_supported(),
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            cgroup2: sock::detect_cgroup_root().ok(),
            uplink_drivers: uplinks
                .iter()
                .map(|u| (u.clone(), ifaces::driver(u).unwrap_or_else(|| "unknown".into())))
                .collect(),
        }
    }

    /// Refuse what cannot work: a kernel without what the programs call, or socket-level
    /// load balancing (`socket_lb`: the flag's value when not off) without its cgroup v2
    /// hierarchy (unless `--cgroup-root` names one) or its hooks.
    pub fn check(&self, socket_lb: Option<&'static str>, cgroup_root_given: bool) -> Result<(), FeatureError> {
        let kernel = |helper, what| FeatureError::Kernel { release: self.release.clone(), helper, what };
        if self.xdp_multi_buffer == Some(false) {
            return Err(kernel("bpf_xdp_get_buff_len", "XDP multi-buffer, Linux 5.18"));
        }
        if self.redirect_neigh == Some(false) {
            return Err(kernel("bpf_redirect_neigh", "TC, Linux 5.10"));
        }
        let Some(mode) = socket_lb else { return Ok(()) };
        if self.sock_addr_set_retval == Some(false) {
            let why =
                format!("kernel {} has no bpf_set_retval for cgroup sock_addr programs (Linux >= 5.18)", self.release);
            return Err(FeatureError::SocketLb { mode, why });
        }
        if self.cgroup2.is_none() && !cgroup_root_given {
            let why = "no cgroup v2 hierarchy is mounted (/proc/self/mountinfo has no cgroup2; or pass --cgroup-root)";
            return Err(FeatureError::SocketLb { mode, why: why.into() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> KernelFeatures {
        KernelFeatures {
            release: "6.6.0".into(),
            xdp_multi_buffer: Some(true),
            redirect_neigh: Some(true),
            xdp_metadata: true,
            sock_addr_set_retval: Some(true),
            tcx: true,
            btf: true,
            cgroup2: Some("/sys/fs/cgroup".into()),
            uplink_drivers: Vec::new(),
        }
    }

    #[test]
    fn a_kernel_with_everything_takes_every_configuration() {
        assert!(all().check(Some("on"), false).is_ok());
        assert!(all().check(None, false).is_ok());
        // No tcx, no BTF: clsact filters, nothing refused.
        let old = KernelFeatures { tcx: false, btf: false, ..all() };
        assert!(old.check(Some("on"), false).is_ok());
    }

    /// Socket-level load balancing without cgroup v2 or without its hooks is refused, and
    /// the error names the flag and the way out; with it off, nothing is refused.
    #[test]
    fn socket_lb_it_cannot_honour_is_refused_naming_the_flag() {
        let no_cgroup2 = KernelFeatures { cgroup2: None, ..all() };
        let msg = no_cgroup2.check(Some("on"), false).unwrap_err().to_string();
        assert!(msg.starts_with("--socket-lb=on: no cgroup v2") && msg.contains("--socket-lb=off"), "{msg}");
        assert!(no_cgroup2.check(Some("host-only"), true).is_ok(), "--cgroup-root names one");
        assert!(no_cgroup2.check(None, false).is_ok());
        let no_hooks = KernelFeatures { release: "5.15.0".into(), sock_addr_set_retval: Some(false), ..all() };
        let msg = no_hooks.check(Some("host-only"), false).unwrap_err().to_string();
        assert!(msg.starts_with("--socket-lb=host-only: kernel 5.15.0") && msg.contains("5.18"), "{msg}");
        // A probe that failed refuses nothing.
        assert!(KernelFeatures { sock_addr_set_retval: None, ..all() }.check(Some("on"), false).is_ok());
    }

    #[test]
    fn a_kernel_older_than_5_18_is_refused_with_the_requirement() {
        let old = KernelFeatures { release: "5.15.0-91-generic".into(), xdp_multi_buffer: Some(false), ..all() };
        let msg = old.check(None, false).unwrap_err().to_string();
        assert!(msg.contains("5.15.0-91-generic") && msg.contains("Linux >= 5.18"), "{msg}");
    }

    /// The object needs no kernel BTF: it carries no CO-RE relocations (what docs/deploy.md
    /// says under "Compatibility").
    #[test]
    fn the_datapath_object_has_no_btf_relocations() {
        let obj = aya_obj::Object::parse(crate::dataplane::EBPF_OBJECT).expect("the embedded object parses");
        assert!(!obj.has_btf_relocations());
    }

    /// This machine's kernel (the build machines run >= 6.6): every probe answers yes.
    #[test]
    #[ignore = "needs root (BPF): run by `cargo xtask test` as root"]
    fn this_kernel_gives_every_feature() {
        let f = KernelFeatures::probe(&["lo".into()]);
        assert_eq!(f.xdp_multi_buffer, Some(true), "{f:?}");
        assert_eq!(f.redirect_neigh, Some(true), "{f:?}");
        assert_eq!(f.sock_addr_set_retval, Some(true), "{f:?}");
        assert!(f.tcx && f.btf && f.cgroup2.is_some(), "{f:?}");
        assert!(f.check(Some("on"), false).is_ok());
    }
}
