//! The translation itself. See the module docs of `model`.
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::types::{DesiredState, NodeInfo, Warning};

/// Translate every Service with its EndpointSlices into the desired frontends for `node`.
/// Malformed objects produce one `Warning` each and are skipped; the rest still translate.
pub fn translate(
    _services: &[Service],
    _slices: &[EndpointSlice],
    _node: &NodeInfo,
) -> (DesiredState, Vec<Warning>) {
    (DesiredState::default(), Vec::new())
}
