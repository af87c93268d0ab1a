//! Where the agent finds the Kubernetes API server, and what it says when it cannot.
//!
//! Inside a pod the default is the `kubernetes` Service's ClusterIP (the kubelet's
//! `KUBERNETES_SERVICE_HOST`). On a cluster without kube-proxy nothing serves that address
//! until this agent has programmed it, so the first agent of a new cluster would wait for
//! itself forever: the API server's own address is a setting of the install
//! (`--api-server`), and an agent stuck on the ClusterIP says which setting to fill in.
use std::net::{IpAddr, SocketAddr};

use http::Uri;

/// Where an operator sets the API server's address, as named in errors and docs.
pub const SETTING: &str =
    "--api-server (Kustomize: ConfigMap ebpf-proxy-config key api-server; Helm: value apiServer.host)";

/// The API server's port when `--api-server` names only a host (kube-apiserver's default
/// secure port, what kubeadm and kind use).
pub const DEFAULT_PORT: u16 = 6443;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--api-server {value:?}: {reason} (expected https://HOST:PORT, HOST:PORT or HOST)")]
pub struct ApiServerError {
    value: String,
    reason: &'static str,
}

/// `--api-server`: an `https://` (or `http://`) URL, `HOST:PORT`, `[IPv6]:PORT`, or a bare
/// host or address (port [`DEFAULT_PORT`]). Empty means unset: the ConfigMap's default.
pub fn parse(value: &str) -> Result<Option<Uri>, ApiServerError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let err = |reason| ApiServerError { value: value.to_string(), reason };
    let text = if v.contains("://") {
        v.to_string()
    } else if let Ok(ip) = v.parse::<IpAddr>() {
        // A bare IPv6 address has colons that are not a port separator.
        format!("https://{}", SocketAddr::new(ip, DEFAULT_PORT))
    } else if v.rsplit_once(':').is_some_and(|(h, _)| !h.is_empty() && (h.ends_with(']') || !h.contains(':'))) {
        format!("https://{v}")
    } else {
        format!("https://{v}:{DEFAULT_PORT}")
    };
    let uri: Uri = text.parse().map_err(|_| err("not a valid address"))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => return Err(err("the scheme must be https or http")),
    }
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Err(err("no host"));
    };
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let Some(port) = authority.strip_prefix(host) else {
        return Err(err("user info is not allowed"));
    };
    if !port.is_empty() && port.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()).is_none() {
        return Err(err("the port is not a number"));
    }
    if host.contains(char::is_whitespace) {
        return Err(err("not a valid host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
        return Err(err("a path is not allowed"));
    }
    Ok(Some(uri))
}

/// The API server as a socket address, when the URI names an IP address.
fn socket_addr(uri: &Uri) -> Option<SocketAddr> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().ok()?;
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    Some(SocketAddr::new(ip, port))
}

/// The bootstrap hint, once known: the watchers start while the programs are still being
/// verified, before the pinned state says whether the address is served; the agent fills
/// the cell then, and errors from then on carry the hint.
pub type HintCell = std::sync::Arc<std::sync::OnceLock<std::sync::Arc<str>>>;

/// What to tell the operator when the API server cannot be reached before the first sync:
/// `Some` when the client's address is the `kubernetes` Service's ClusterIP
/// (`service_host`, the kubelet's `KUBERNETES_SERVICE_HOST`), `--api-server` was not
/// given, and the datapath does not serve that address (`served`: a new node, or a
/// cluster whose first agent this is).
pub fn bootstrap_hint(
    client_url: &Uri,
    api_server_given: bool,
    service_host: Option<&str>,
    served: impl Fn(SocketAddr) -> bool,
) -> Option<String> {
    if api_server_given {
        return None;
    }
    let addr = socket_addr(client_url)?;
    let service_ip: IpAddr = service_host?.trim().parse().ok()?;
    if addr.ip() != service_ip || served(addr) {
        return None;
    }
    Some(format!(
        "the API server address {addr} is the `kubernetes` Service's ClusterIP, which nothing serves on a node \
         without kube-proxy until this agent has synced: set the API server's own address with {SETTING}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(v: &str) -> String {
        parse(v).unwrap().unwrap().to_string()
    }

    #[test]
    fn every_accepted_form_becomes_an_https_url() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("  ").unwrap(), None);
        assert_eq!(url("10.0.0.1"), "https://10.0.0.1:6443/");
        assert_eq!(url("10.0.0.1:443"), "https://10.0.0.1:443/");
        assert_eq!(url("https://api.example.com:8443"), "https://api.example.com:8443/");
        assert_eq!(url("api.example.com"), "https://api.example.com:6443/");
        assert_eq!(url("fd00::1"), "https://[fd00::1]:6443/");
        assert_eq!(url("[fd00::1]:443"), "https://[fd00::1]:443/");
        assert_eq!(url("http://127.0.0.1:8080"), "http://127.0.0.1:8080/");
    }

    #[test]
    fn bad_values_are_named_errors() {
        for bad in ["ftp://10.0.0.1", "https://", "https://10.0.0.1:6443/api", "10.0.0.1:notaport", "a b", "u@h:1"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--api-server {bad:?}")), "{e}");
        }
    }

    #[test]
    fn the_hint_is_given_only_for_an_unserved_kubernetes_clusterip() {
        let cluster_ip: Uri = "https://10.96.0.1:443".parse().unwrap();
        let unserved = |_| false;
        let hint = bootstrap_hint(&cluster_ip, false, Some("10.96.0.1"), unserved).unwrap();
        assert!(hint.contains("10.96.0.1:443") && hint.contains("api-server") && hint.contains("apiServer.host"));
        // The operator chose the address: no second-guessing.
        assert_eq!(bootstrap_hint(&cluster_ip, true, Some("10.96.0.1"), unserved), None);
        // The pinned datapath serves it (a restart): the failure is something else.
        assert_eq!(bootstrap_hint(&cluster_ip, false, Some("10.96.0.1"), |a| a.port() == 443), None);
        // Not the Service address (a kubeconfig's server), or not in a pod.
        let real: Uri = "https://192.168.1.10:6443".parse().unwrap();
        assert_eq!(bootstrap_hint(&real, false, Some("10.96.0.1"), unserved), None);
        assert_eq!(bootstrap_hint(&cluster_ip, false, None, unserved), None);
        let v6: Uri = "https://[fd00:10:96::1]:443".parse().unwrap();
        assert!(bootstrap_hint(&v6, false, Some("fd00:10:96::1"), unserved).is_some());
    }
}
