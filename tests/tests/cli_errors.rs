//! The CLI explains what is wrong instead of failing obscurely.
use std::process::Command;

use proxy_tests::{agent::ebpf_proxy_bin, harness::require_root};

#[test]
fn missing_pins_name_the_directory() {
    let out = Command::new(ebpf_proxy_bin().unwrap())
        .args(["services", "--bpffs-root", "/sys/fs/bpf/ebpf-proxy-does-not-exist"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no pinned maps under /sys/fs/bpf/ebpf-proxy-does-not-exist"), "{err}");
}

#[test]
#[ignore = "needs root (BPF, network namespaces): run by `cargo xtask test` as root"]
fn unprivileged_caller_is_told_to_use_root() {
    require_root("unprivileged_caller_is_told_to_use_root (drops to nobody itself)");
    // Pins exist (a loaded dataplane), but the caller is not root.
    let dp = proxy_tests::harness::TestDataplane::load();
    let bin = ebpf_proxy_bin().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&bin)
        .args(["services", "--bpffs-root"])
        .arg(&dp.pins.0)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied") && err.contains("root"), "{err}");
}
