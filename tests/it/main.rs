//! The integration tests, one test crate (one link of the dependency tree instead of one per
//! file). Each module is one area; `common` holds the shared support: an in-process server
//! (`TestServer`), the `vectord` binary as a child process (`common::child`), TLS material
//! (`common::tls`), the load driver (`common::load`) and helpers such as `eventually`.
//!
//! Run one area with `cargo test --test it autotune::`, one test with its name as the filter.

mod common;

mod adopt;
mod autotune;
mod bad_requests;
mod binary;
mod cli;
mod cluster;
mod compaction;
mod crash;
mod edge;
mod fidelity;
mod findable;
mod fuzz;
mod group_commit;
mod index_service;
mod limits;
mod load;
mod metrics;
mod progress;
mod refresh;
mod reliability;
mod scale_measure;
mod security;
mod snapshots;
mod unindexed;
