//! Kubernetes objects (Service + EndpointSlice YAML) for the synthetic services, the input
//! of `model::translate` and of the agent's `--manifests` directory.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use proxy_userspace::source::{Objects, files};

use crate::rules::{NAMESPACE, PORT_NAME, Svc};

pub const NODE_NAME: &str = "node-a";

fn push_service(out: &mut String, s: &Svc) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n  - name: {PORT_NAME}\n    port: {port}\n    targetPort: {tp}\n    protocol: TCP\n",
        name = s.name,
        vip = s.vip,
        port = s.port,
        tp = s.endpoints.first().map(|e| e.1).unwrap_or(crate::rules::TARGET_PORT),
    );
}

/// One slice per service (kube's default slice holds up to 100 endpoints).
fn push_slice(out: &mut String, s: &Svc, slice_name: &str) {
    let port = s.endpoints.first().map(|e| e.1).unwrap_or(crate::rules::TARGET_PORT);
    let _ = write!(
        out,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice_name}\n  namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: {PORT_NAME}\n  port: {port}\n  protocol: TCP\nendpoints:\n",
        name = s.name,
    );
    for (j, (ip, _)) in s.endpoints.iter().enumerate() {
        let _ = write!(
            out,
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: {NODE_NAME}\n  targetRef: {{kind: Pod, name: {}-{j}, namespace: {NAMESPACE}}}\n",
            s.name
        );
    }
}

pub fn slice_name(s: &Svc) -> String {
    format!("{}-abcde", s.name)
}

/// The services (each with its one slice) as one multi-document YAML text.
pub fn manifest_text(svcs: &[Svc]) -> String {
    let mut out = String::with_capacity(svcs.len() * 1500);
    for s in svcs {
        push_service(&mut out, s);
        push_slice(&mut out, s, &slice_name(s));
    }
    out
}

/// Write the services as multi-document YAML files (1,000 services per file) into `dir`.
pub fn write_manifests(dir: &Path, svcs: &[Svc]) -> Result<()> {
    for (k, chunk) in svcs.chunks(1000).enumerate() {
        let out = manifest_text(chunk);
        let path = dir.join(format!("services-{k:04}.yaml"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The objects the agent would hold for these services (parsed by the agent's own loader).
pub fn objects(svcs: &[Svc]) -> Result<Objects> {
    let dir = proxy_tests::agent::TempDir::new("ebpf-proxy-bench-objects-")?;
    write_manifests(&dir.0, svcs)?;
    let (objects, warnings) = files::load_dir(&dir.0, NODE_NAME)?;
    anyhow::ensure!(warnings.is_empty(), "generated manifests do not parse: {:?}", warnings.first());
    anyhow::ensure!(
        objects.services.len() == svcs.len() && objects.slices.len() == svcs.len(),
        "parsed {} services and {} slices, wrote {}",
        objects.services.len(),
        objects.slices.len(),
        svcs.len()
    );
    Ok(objects)
}
