//! The hasher of the agent's own in-memory indexes (the translator's, the sync mirror's,
//! the id allocators'): foldhash instead of std's SipHash. Their keys are short (object
//! names, ids, addresses) and hashed on every object and every backend: at 10,000 Services
//! SipHash was about a tenth of the translation. Like std's, the seed is random per
//! process, so colliding names cannot be prepared from outside.
pub use foldhash::fast::RandomState;

pub type HashMap<K, V> = std::collections::HashMap<K, V, RandomState>;
pub type HashSet<T> = std::collections::HashSet<T, RandomState>;
