//! vectord: approximate nearest-neighbour search over gRPC whose HNSW configuration is measured,
//! not guessed. See the README for the user's manual.
//!
//! These docs are for the people who work on vectord (`cargo doc --no-deps
//! --document-private-items`; ARCHITECTURE.md is the map): public items may link to private ones.
#![allow(rustdoc::private_intra_doc_links)]

pub mod admission;
pub mod app;
pub mod auth;
pub mod autotune;
pub mod catalog;
pub mod cluster;
pub mod compaction;
pub mod config;
pub mod connections;
pub mod dataset;
pub mod error;
pub mod grpc;
pub mod index;
pub mod metrics;
pub mod model;
pub mod promotion;
pub mod refresh;
pub mod server;
pub mod snapshots;
pub mod store;
pub mod tasks;

/// The generated `vectord.v1` types and services. Their docs are the proto's comments, written
/// for readers of the contract (`<job id>`, `grid[3]`), not as rustdoc markup.
#[allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]
pub mod pb {
    tonic::include_proto!("vectord.v1");

    /// The encoded file descriptor set of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("vectord_descriptor");
}
