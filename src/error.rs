//! The one domain error type and its one mapping to gRPC status codes.
//!
//! Every variant has a decided code: the `match` in `From<Error> for Status` has no `_` arm, so a
//! new variant cannot ship without one. Messages say what was wrong and what is allowed.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
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
    /// The server is starting up or shutting down, or an engine of the cluster (etcd, NATS)
    /// does not answer.
    #[error("{0}")]
    Unavailable(String),
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

    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(_) | Error::OutOfRange { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::Conflict(_) => Code::Aborted,
            Error::Limit(_) => Code::ResourceExhausted,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Store(_) | Error::Corrupt(_) | Error::Internal(_) => Code::Internal,
        }
    }
}

/// The longest status message sent, in bytes. A message may quote what the client sent (a job
/// id, a page token); quoted whole, a huge value makes a grpc-message header larger than the
/// header list HTTP/2 clients accept (16 KiB for tonic's), and the client drops the whole
/// connection. Percent-encoding can triple the bytes on the wire: still far under that.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `message`, cut at a character boundary to at most [`MAX_STATUS_MESSAGE`] bytes plus a note of
/// its full length.
fn clip_message(mut message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let full = message.len();
    let mut end = MAX_STATUS_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("… (clipped; {full} bytes)"));
    message
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if code == Code::Internal {
            // Handled here, logged once: the caller only sees the status.
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, clip_message(e.to_string()))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("a background task failed: {e}"))
    }
}
