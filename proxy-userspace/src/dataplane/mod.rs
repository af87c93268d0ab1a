//! Kernel side (work in progress).
