//! Harnesses, trials, the journal and the autotune job loop.

pub mod adaptive;
pub mod harness;
pub mod jobs;
pub mod lab;
pub mod select;
pub mod shared;
pub mod trial;
