//! The services' names, taken from the generated code (`NamedService::NAME`), so the tables
//! keyed by them (auth, admission, health) cannot drift from the contract. Method names are
//! not generated as constants: the tables that name methods are checked against the
//! descriptor set in tests (`auth`, `admission`).

use tonic::server::NamedService;

use crate::pb;

/// `vectord.v1.IndexService`.
pub const INDEX: &str = <pb::index_service_server::IndexServiceServer<()> as NamedService>::NAME;
/// `vectord.v1.AutotuneService`.
pub const AUTOTUNE: &str =
    <pb::autotune_service_server::AutotuneServiceServer<()> as NamedService>::NAME;
/// `vectord.v1.PromotionService`.
pub const PROMOTION: &str =
    <pb::promotion_service_server::PromotionServiceServer<()> as NamedService>::NAME;
/// `vectord.v1.ClusterService`.
pub const CLUSTER: &str =
    <pb::cluster_service_server::ClusterServiceServer<()> as NamedService>::NAME;
/// `grpc.health.v1.Health`.
pub const HEALTH: &str = <tonic_health::pb::health_server::HealthServer<()> as NamedService>::NAME;
/// `grpc.reflection.v1.ServerReflection`.
pub const REFLECTION_V1: &str = <tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<()> as NamedService>::NAME;
/// `grpc.reflection.v1alpha.ServerReflection`.
pub const REFLECTION_V1ALPHA: &str = <tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<()> as NamedService>::NAME;

/// The vectord services.
pub const VECTORD: [&str; 4] = [INDEX, AUTOTUNE, PROMOTION, CLUSTER];

/// `path` (`/service/method`, as HTTP/2 carries it) as (service, method); the method is empty
/// when the path has none.
pub fn split_path(path: &str) -> (&str, &str) {
    let name = path.strip_prefix('/').unwrap_or(path);
    name.split_once('/').unwrap_or((name, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_are_the_contract_ones() {
        assert_eq!(
            VECTORD,
            [
                "vectord.v1.IndexService",
                "vectord.v1.AutotuneService",
                "vectord.v1.PromotionService",
                "vectord.v1.ClusterService",
            ]
        );
        assert_eq!(HEALTH, "grpc.health.v1.Health");
        assert_eq!(REFLECTION_V1, "grpc.reflection.v1.ServerReflection");
        assert_eq!(
            REFLECTION_V1ALPHA,
            "grpc.reflection.v1alpha.ServerReflection"
        );
        assert_eq!(split_path("/a.B/C"), ("a.B", "C"));
        assert_eq!(split_path("/a.B"), ("a.B", ""));
    }
}
