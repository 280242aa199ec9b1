//! Generations and the engine seam: the only code that names hnsw_rs.

pub mod distance;
pub mod engine;
mod fresh;
pub mod generation;
mod layout;
pub mod native;
pub mod progress;
pub mod snapshot;

pub use distance::evals_on_this_thread;
pub use generation::Generation;
pub use progress::{Activities, Phase, Progress, ProgressView, Tracked};
