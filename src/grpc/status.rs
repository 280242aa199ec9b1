//! The one mapping of the domain [`Error`] to a gRPC status: every variant has a decided code
//! (the `match` has no `_` arm, so a new variant cannot ship without one), and every message is
//! clipped to a size any HTTP/2 client accepts.

use tonic::{Code, Status};

use crate::error::Error;

/// The gRPC code of a domain error (an extension of [`Error`] that only the edge imports).
pub trait ErrorCode {
    fn code(&self) -> Code;
}

impl ErrorCode for Error {
    fn code(&self) -> Code {
        match self {
            Error::Invalid(_) | Error::OutOfRange { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::Conflict(_) => Code::Aborted,
            Error::Limit(_) => Code::ResourceExhausted,
            Error::Cancelled(_) => Code::Cancelled,
            Error::Unavailable(_) | Error::Engine { .. } => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::JobFailed { cause, .. } => cause.code(),
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
