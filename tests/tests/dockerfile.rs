//! The Dockerfile's toolchain layer copies every workspace member's manifest before the
//! sources (cargo refuses to load a workspace with a member missing): a member added to
//! `Cargo.toml` without its line in the Dockerfile broke every image build silently once
//! (`bench`, issue 20). Needs no container engine.
use std::path::Path;

/// The `members = [...]` of the workspace manifest.
fn workspace_members(manifest: &str) -> Vec<String> {
    let line = manifest.lines().find(|l| l.trim_start().starts_with("members")).expect("members = [...] in Cargo.toml");
    let list = line.split_once('[').and_then(|(_, r)| r.split_once(']')).expect("members on one line").0;
    list.split(',').map(|m| m.trim().trim_matches('"').to_string()).filter(|m| !m.is_empty()).collect()
}

#[test]
fn dockerfile_copies_every_workspace_member_manifest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let members = workspace_members(&manifest);
    assert!(members.len() >= 6, "members parsed: {members:?}");
    // Before the full source copy (`COPY ... . .`), each member's manifest, or its whole
    // directory, must be in the image.
    let before_sources = dockerfile.split("COPY --chown=builder:builder . .").next().expect("Dockerfile");
    let missing: Vec<&String> = members
        .iter()
        .filter(|m| {
            !before_sources.contains(&format!(" {m}/Cargo.toml {m}/"))
                && !before_sources.contains(&format!(" {m}/ {m}/"))
        })
        .collect();
    assert!(missing.is_empty(), "the Dockerfile's toolchain layer does not copy these members' manifests: {missing:?}");
}
