//! Kubernetes objects -> desired map state, with upstream kube-proxy semantics.
//! Pure: no I/O, no clocks, no globals; everything it needs comes in as arguments, so it is
//! unit-tested on its own (see `translate` tests).
pub mod addr;
pub mod maglev;
pub mod node;
pub mod service_cidrs;
pub mod translate;
pub mod types;

pub use translate::{
    ANNOTATION_LB_ALGORITHM, ClaimSource, MISSING_METADATA, ObjectKey, Translator, TriggerTimes, explain, object_key,
    translate, translate_with_claims,
};
pub use types::*;
