//! The parts of the project's tasks that tests reuse: the image build (`cargo xtask image`),
//! which the pod-spec e2e (`tests/tests/e2e_pod.rs`) runs as it is.
pub mod image;
