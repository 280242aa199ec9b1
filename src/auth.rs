//! API keys: a tower layer in front of every service that checks `authorization: Bearer <key>`
//! against the admin key and the read-only key, and decides from one table which methods the
//! read-only role may call.
//!
//! Invariants: health and reflection are open (probes carry no key); a method that is not in
//! [`READ_ONLY_METHODS`] needs the admin key, so a new RPC is admin-only until someone adds it to
//! the table; keys are compared in constant time and never printed (their `Debug` is redacted,
//! and no message echoes what the caller sent).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::grpc::names;
use crate::grpc::status::ErrorCode;

/// Services anyone may call without a key: probes and tooling.
pub const OPEN_SERVICES: [&str; 3] = [
    names::HEALTH,
    names::REFLECTION_V1,
    names::REFLECTION_V1ALPHA,
];

/// The methods a read-only key may call, as (service, method); every other vectord method
/// needs the admin key. Checked against the contract's descriptor set in the tests.
pub const READ_ONLY_METHODS: [(&str, &str); 15] = [
    (names::INDEX, "GetIndex"),
    (names::INDEX, "ListIndexes"),
    (names::INDEX, "Search"),
    (names::INDEX, "SearchBatch"),
    (names::INDEX, "GetPoint"),
    (names::INDEX, "GetProfile"),
    (names::INDEX, "ListProfiles"),
    (names::AUTOTUNE, "GetHarness"),
    (names::AUTOTUNE, "ListHarnesses"),
    (names::AUTOTUNE, "GetTrial"),
    (names::AUTOTUNE, "ListTrials"),
    (names::AUTOTUNE, "ListJobs"),
    (names::AUTOTUNE, "GetParetoFront"),
    (names::PROMOTION, "GetPromoted"),
    (names::CLUSTER, "ListNodes"),
];

/// What a call needs, from its path `/service/method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Open,
    ReadOnly,
    Admin,
}

pub fn access_of(path: &str) -> Access {
    let (service, method) = names::split_path(path);
    if OPEN_SERVICES.contains(&service) {
        Access::Open
    } else if READ_ONLY_METHODS.contains(&(service, method)) {
        Access::ReadOnly
    } else {
        Access::Admin
    }
}

/// A key; its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey(Vec<u8>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// `what` names the flag in the error. A key is what a caller can put in an HTTP header
    /// after `Bearer `: visible ASCII, no spaces.
    pub fn parse(what: &str, key: &str) -> Result<Self> {
        if key.is_empty() {
            return Err(Error::invalid(format!(
                "{what} is empty: give a non-empty key (e.g. from `openssl rand -hex 32`)"
            )));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(format!(
                "{what} must be visible ASCII without spaces (it is sent as `authorization: Bearer <key>`)"
            )));
        }
        Ok(ApiKey(key.as_bytes().to_vec()))
    }

    /// The header value a client sends: `Bearer <key>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    /// Constant time in the content (the length of the key may show).
    fn matches(&self, given: &[u8]) -> bool {
        bool::from(self.0.as_slice().ct_eq(given))
    }
}

/// The keys the server accepts: an admin key (every method), and optionally a read-only key.
#[derive(Clone, Debug)]
pub struct ApiKeys {
    admin: ApiKey,
    read_only: Option<ApiKey>,
}

/// The role a key was recognised as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
}

/// The header a caller must send.
pub const EXPECTED: &str = "`authorization: Bearer <key>` metadata";

impl ApiKeys {
    pub fn new(admin: ApiKey, read_only: Option<ApiKey>) -> Result<Self> {
        if let Some(ro) = &read_only {
            if ro.matches(&admin.0) {
                return Err(Error::invalid(
                    "the read-only API key is the same as the admin key: give two different keys",
                ));
            }
        }
        Ok(ApiKeys { admin, read_only })
    }

    /// The admin key (a cluster node calls its peers' internal RPCs with it).
    pub fn admin(&self) -> &ApiKey {
        &self.admin
    }

    pub fn has_read_only(&self) -> bool {
        self.read_only.is_some()
    }

    /// The role of the caller from its `authorization` header value.
    pub fn role(&self, header: Option<&http::HeaderValue>) -> Result<Role> {
        let Some(value) = header else {
            return Err(Error::Unauthenticated(format!(
                "this server requires an API key: send {EXPECTED}"
            )));
        };
        let bytes = value.as_bytes();
        let key = match bytes.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
            _ => {
                return Err(Error::Unauthenticated(format!(
                    "malformed authorization: send {EXPECTED}"
                )))
            }
        };
        // Both comparisons always run, so the time does not tell which key was close.
        let admin = self.admin.matches(key);
        let read_only = self.read_only.as_ref().is_some_and(|k| k.matches(key));
        if admin {
            Ok(Role::Admin)
        } else if read_only {
            Ok(Role::ReadOnly)
        } else {
            Err(Error::Unauthenticated(format!(
                "the API key is not valid: send a key the server was started with, as {EXPECTED}"
            )))
        }
    }

    /// Ok when the caller may call `path`.
    pub fn check(&self, path: &str, header: Option<&http::HeaderValue>) -> Result<()> {
        let need = access_of(path);
        if need == Access::Open {
            return Ok(());
        }
        match (self.role(header)?, need) {
            (Role::Admin, _) | (Role::ReadOnly, Access::ReadOnly | Access::Open) => Ok(()),
            (Role::ReadOnly, Access::Admin) => Err(Error::PermissionDenied(format!(
                "{} changes state: the read-only API key may not call it; an admin key (--api-key) is required",
                path.strip_prefix('/').unwrap_or(path)
            ))),
        }
    }
}

/// The tower layer: every call goes through [`ApiKeys::check`]; a refused call is answered
/// here with its status and never reaches a handler. Without keys every call passes.
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<ApiKeys>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            keys: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    keys: Option<Arc<ApiKeys>>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let checked = match &self.keys {
            None => Ok(()),
            Some(keys) => keys.check(
                req.uri().path(),
                req.headers().get(http::header::AUTHORIZATION),
            ),
        };
        match checked {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(e) => {
                tracing::info!(method = %req.uri().path(), code = ?e.code(), "call refused: {e}");
                let resp = tonic::Status::from(e).into_http::<ResBody>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys::new(
            ApiKey::parse("--api-key", "admin-secret").unwrap(),
            Some(ApiKey::parse("--read-only-api-key", "reader-secret").unwrap()),
        )
        .unwrap()
    }

    fn header(s: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn roles_from_the_header() {
        let k = keys();
        assert_eq!(
            k.role(Some(&header("Bearer admin-secret"))).unwrap(),
            Role::Admin
        );
        assert_eq!(
            k.role(Some(&header("bearer reader-secret"))).unwrap(),
            Role::ReadOnly
        );
        for bad in [
            "Bearer nope",
            "Bearer admin-secre",
            "Bearer admin-secret2",
            "admin-secret",
            "Basic admin-secret",
            "Bearer ",
        ] {
            let e = k.role(Some(&header(bad))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        assert_eq!(
            k.role(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn access_table() {
        let k = keys();
        let ro = header("Bearer reader-secret");
        assert!(k.check("/grpc.health.v1.Health/Check", None).is_ok());
        assert!(k
            .check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None
            )
            .is_ok());
        assert!(k
            .check("/vectord.v1.IndexService/Search", Some(&ro))
            .is_ok());
        let e = k
            .check("/vectord.v1.IndexService/UpsertPoints", Some(&ro))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.to_string()
                .contains("vectord.v1.IndexService/UpsertPoints"),
            "{e}"
        );
        // Unknown methods need the admin key.
        assert_eq!(access_of("/vectord.v1.IndexService/Nope"), Access::Admin);
        assert_eq!(access_of("/grpc.health.v1.HealthX/Check"), Access::Admin);
    }

    /// Every RPC of the contract is classified on purpose: the read-only table names only
    /// methods that exist, and they are exactly the ones that read (Get*, List*, Search*).
    #[test]
    fn the_table_matches_the_contract() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut all = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    all.push((
                        format!("{}.{}/{}", file.package(), service.name(), method.name()),
                        method.name().to_string(),
                    ));
                }
            }
        }
        assert!(all.len() > 25, "{all:?}");
        for (service, method) in READ_ONLY_METHODS {
            let m = format!("{service}/{method}");
            assert!(
                all.iter().any(|(full, _)| *full == m),
                "{m} is not an RPC of the contract"
            );
        }
        for (full, name) in &all {
            let reads = ["Get", "List", "Search"]
                .iter()
                .any(|p| name.starts_with(p));
            assert_eq!(
                access_of(&format!("/{full}")) == Access::ReadOnly,
                reads,
                "{full}"
            );
        }
    }

    #[test]
    fn keys_are_validated_and_redacted() {
        assert!(ApiKey::parse("--api-key", "").is_err());
        assert!(ApiKey::parse("--api-key", "a b").is_err());
        let k = ApiKey::parse("--api-key", "s3cret").unwrap();
        assert!(!format!("{k:?}").contains("s3cret"));
        assert!(!format!("{:?}", keys()).contains("secret"));
        assert!(ApiKeys::new(k.clone(), Some(k)).is_err());
    }
}
