//! The one domain error type. It names no transport: the gRPC edge maps it to a status once
//! (`grpc::status`), where every variant has a decided code (the `match` there has no `_` arm,
//! so a new variant cannot ship without one). Messages say what was wrong and what is allowed.

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// A field of a request is malformed or out of its allowed range.
    #[error("{0}")]
    Invalid(String),
    #[error("{field} must be in {range}, got {got}")]
    OutOfRange {
        field: String,
        range: String,
        got: String,
    },
    #[error("{what} {name:?} not found")]
    NotFound { what: &'static str, name: String },
    #[error("{what} {name:?} already exists")]
    AlreadyExists { what: &'static str, name: String },
    /// The request is valid but the state does not allow it (an empty index, nothing to roll back).
    #[error("{0}")]
    Precondition(String),
    /// Another job holds what the request needs.
    #[error("{0}")]
    Conflict(String),
    /// A configured limit was hit.
    #[error("{0}")]
    Limit(String),
    /// The caller cancelled, or the job was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// The server is starting up or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A cluster node's engine (etcd or NATS JetStream, `engine`) did not answer or refused
    /// the call; the message names the engine and its endpoints (docs/cluster.md).
    #[error("{engine} ({endpoints}){what}: {detail}")]
    Engine {
        engine: &'static str,
        endpoints: String,
        /// What was being done, e.g. " (creating the index)", or empty.
        what: String,
        detail: String,
    },
    /// The caller's deadline ended a wait (a search waiting for a write-log sequence).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// No API key, a malformed one, or a key the server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid key whose role may not call the method.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("storage: {0}")]
    Store(#[from] sled::Error),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
    /// An autotune job failed; the code a client sees is its cause's.
    #[error("job {job} failed: {cause}")]
    JobFailed { job: String, cause: Box<Error> },
    /// A bug: an invariant the code relies on did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    pub fn out_of_range(
        field: impl Into<String>,
        range: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        Error::OutOfRange {
            field: field.into(),
            range: range.to_string(),
            got: got.to_string(),
        }
    }

    pub fn not_found(what: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound {
            what,
            name: name.into(),
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("a background task failed: {e}"))
    }
}
