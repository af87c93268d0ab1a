//! Map sync (work in progress).
