//! The objects the operator commands (`explain`, `verify`) reason about, read once from
//! the same sources the agent uses: a directory of manifests, or the Kubernetes API
//! (kubeconfig or in-cluster config), plus this node's Node object and, from the API, the
//! ServiceCIDRs.
use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::api::{Api, ListParams};

use crate::source::{Objects, files};

/// What the operator commands read.
pub struct Inspected {
    pub objects: Objects,
    /// The API's ServiceCIDR objects; `None` where there are none to be had (a directory of
    /// manifests, or an API server without the resource): `--service-cidr` says, as for the
    /// agent, beside the ServiceCIDRs the manifests hold (`objects.service_cidrs`).
    pub service_cidrs: Option<Vec<ServiceCIDR>>,
}

/// Every Service and EndpointSlice, and `node_name`'s Node, as the agent would see them now;
/// with `service_cidrs` (verify needs them, explain does not) the API's ServiceCIDRs too.
pub fn load_objects(
    manifests: Option<&Path>,
    kubeconfig: Option<&str>,
    context: Option<&str>,
    api_server: Option<&str>,
    node_name: &str,
    service_cidrs: bool,
) -> Result<Inspected> {
    if let Some(dir) = manifests {
        let (objects, warnings) =
            files::load_dir(dir, node_name).with_context(|| format!("reading manifests from {}", dir.display()))?;
        for w in warnings {
            tracing::warn!(file = %w.file.display(), problem = %w.message, "manifest skipped");
        }
        return Ok(Inspected { objects, service_cidrs: None });
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    rt.block_on(async {
        let api_server = crate::source::apiserver::parse(api_server.unwrap_or_default())?;
        let (client, _) = crate::agent::kube_client(kubeconfig, context, api_server.as_ref()).await?;
        let lp = ListParams::default();
        let services = Api::<Service>::all(client.clone()).list(&lp).await.context("listing Services")?;
        let slices = Api::<EndpointSlice>::all(client.clone()).list(&lp).await.context("listing EndpointSlices")?;
        let node = Api::<Node>::all(client.clone()).get_opt(node_name).await.context("reading this node's Node")?;
        let service_cidrs = if !service_cidrs {
            None
        } else {
            match Api::<ServiceCIDR>::all(client).list(&lp).await {
                Ok(list) => Some(list.items),
                Err(kube::Error::Api(e)) if e.code == 404 => None,
                Err(e) => return Err(e).context("listing ServiceCIDRs"),
            }
        };
        let objects = Objects {
            services: services.items.into_iter().map(Arc::new).collect(),
            slices: slices.items.into_iter().map(Arc::new).collect(),
            node,
            // The API's are `service_cidrs`; only manifests carry theirs in the objects.
            service_cidrs: Vec::new(),
        };
        Ok(Inspected { objects, service_cidrs })
    })
}
