//! The agent's image (issue 20 item 1): one tag everywhere, and an image that runs.
//!
//! - Every manifest, the chart's default and the docs name the image `cargo xtask image`
//!   builds by default, `ghcr.io/ebpf-proxy/ebpf-proxy:<the chart's appVersion>`, and that
//!   version is the agent's own (a user who builds as docs/deploy.md says gets the tag the
//!   manifests pull; before, the manifests said `:dev` and the docs' overlay `:v0.1.0`).
//!   Needs no container engine.
//! - `xtask::image::assemble` builds a `FROM scratch` image that runs the agent's binary
//!   with only the libraries `ldd` found, and has no shell (root, podman and buildah: skips
//!   saying why without them).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use proxy_tests::{
    harness::{require_root, unique},
    podman::{self, PodmanImage, podman},
};
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Every `image:` of the documents of a YAML file (containers and init containers).
fn images_in(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("image", Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        walk(&Value::deserialize(doc).expect("YAML"), &mut out);
    }
    out
}

#[test]
fn one_image_tag_everywhere_and_it_is_the_agents_version() {
    let root = root();
    let tag = xtask::image::default_tag(&root).expect("default tag");
    let app_version = xtask::image::chart_app_version(&root).unwrap();
    assert_eq!(
        app_version,
        env!("CARGO_PKG_VERSION"),
        "the chart's appVersion (the image tag) must be the workspace version the binary reports"
    );
    for file in ["manifests/daemonset.yaml", "manifests/uninstall/cleanup-daemonset.yaml"] {
        let images = images_in(&root.join(file));
        assert!(!images.is_empty(), "{file}: no image");
        for image in images {
            assert_eq!(image, tag, "{file} pulls another image than `cargo xtask image` builds");
        }
    }
    // The chart: an empty tag means its appVersion.
    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("manifests/helm/ebpf-proxy/values.yaml")).unwrap())
            .unwrap();
    let repo = values["image"]["repository"].as_str().expect("image.repository");
    let chart_tag = values["image"]["tag"].as_str().unwrap_or("");
    let chart_image = format!("{repo}:{}", if chart_tag.is_empty() { app_version.as_str() } else { chart_tag });
    assert_eq!(chart_image, tag, "the chart's default image");
    // The docs: no other concrete tag of our image is named anywhere (placeholders such as
    // `<version>` or `X.Y.Z` aside).
    let docs = std::fs::read_to_string(root.join("docs/deploy.md")).unwrap();
    let prefix = format!("{}:", xtask::image::REPOSITORY);
    let named: Vec<&str> = docs
        .match_indices(&prefix)
        .map(|(i, _)| docs[i..].split(|c: char| c.is_whitespace() || c == '`').next().unwrap_or(""))
        .filter(|n| !n.contains('<') && !n.ends_with(":X.Y.Z"))
        .collect();
    assert!(!named.is_empty() && named.iter().all(|n| *n == tag), "docs/deploy.md names {named:?}, the image is {tag}");
    assert!(!docs.contains("newTag: v"), "docs/deploy.md retags the image to a tag nothing builds");
}

#[test]
#[ignore = "needs root (podman, buildah): run by `cargo xtask test` as root"]
fn image_from_scratch_runs_the_agent_and_has_no_shell() {
    let test = "image_from_scratch_runs_the_agent_and_has_no_shell";
    require_root(test);
    // Fail with the reason rather than pass unrun: `cargo xtask setup` installs podman.
    if let Some(why) = podman::unusable() {
        panic!("{test} cannot run: {why}");
    }
    let bin = proxy_tests::agent::ebpf_proxy_bin().expect("ebpf-proxy binary");
    let image = PodmanImage { tag: format!("localhost/ebpf-proxy-image-test:{}", unique("t")) };
    xtask::image::assemble(&bin, &image.tag).expect("image build");

    let config = podman::output(podman().args(["image", "inspect", "--format", "{{json .Config}}", &image.tag]))
        .expect("inspect");
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["Entrypoint"], serde_json::json!([xtask::image::BINARY_PATH]), "{config}");
    assert_eq!(config["Cmd"], serde_json::json!(["agent"]), "{config}");

    // The binary starts: the loader and every library it needs are in the image.
    let run = |args: &[&str]| {
        let name = unique("ebpf-proxy-image-test-");
        let out = podman()
            .args(["run", "--rm", "--name", &name, "--network", "none", "--pull", "never"])
            .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"])
            .args(args)
            .output()
            .expect("podman run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&[&image.tag, "--version"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    // `ebpf-proxy <version> (commit <sha>, built <date>)`.
    let want = format!("ebpf-proxy {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(stdout.trim().starts_with(&want), "{stdout}");

    // Nothing else: no shell to exec (podman reports the missing executable as 127).
    let (code, stdout, stderr) = run(&["--entrypoint", "/bin/sh", &image.tag, "-c", "true"]);
    assert_ne!(code, Some(0), "the image has a shell: {stdout}{stderr}");
    let files = podman::output(Command::new("sh").args([
        "-c",
        &format!("m=$(buildah from --pull=never {0}) && d=$(buildah mount $m) && (cd $d && find . -type f | sort); buildah rm $m >/dev/null", image.tag),
    ]))
    .expect("list the image's files");
    let files: Vec<&str> = files.lines().collect();
    let bin_in_image = format!(".{}", xtask::image::BINARY_PATH);
    assert!(files.contains(&bin_in_image.as_str()), "{files:?}");
    let unexpected: Vec<&&str> =
        files.iter().filter(|f| **f != bin_in_image && !f.contains("/lib") && !f.starts_with("./etc/")).collect();
    assert!(unexpected.is_empty(), "files other than the binary and its libraries: {unexpected:?}");
}
