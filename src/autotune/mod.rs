//! Harnesses, trials, the journal and the autotune job loop.

pub mod trial;
