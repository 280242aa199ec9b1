//! Client errors: one gRPC code and a message, printed as `error: <CODE>: <message>` and mapped
//! to a stable exit code per class.

use std::process::ExitCode;

use tonic::{Code, Status};

/// The exit codes of the client subcommands, shown in `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes of the client subcommands (errors print `error: <GRPC CODE>: <message>` on stderr):
  0    ok
  1    other or internal error (INTERNAL, UNKNOWN, CANCELLED, ...)
  2    usage error (bad flags or arguments)
  3    not found (NOT_FOUND)
  4    invalid argument (INVALID_ARGUMENT, OUT_OF_RANGE; also a malformed import file)
  5    server unavailable, connection failure or deadline exceeded (UNAVAILABLE, DEADLINE_EXCEEDED)
  6    conflict (FAILED_PRECONDITION, ABORTED)
  7    already exists (ALREADY_EXISTS)
  8    resource exhausted (RESOURCE_EXHAUSTED)
  9    no or wrong API key (UNAUTHENTICATED): pass --api-key or set VECTORD_API_KEY
  10   the API key may not call this (PERMISSION_DENIED): a read-only key on a change
  130  interrupted (Ctrl-C)

Client flags: --server (env VECTORD_SERVER, default http://127.0.0.1:50051), --json (one JSON
object per line, proto field names), --timeout SECS (deadline of each call: default 30 s for
quick unary calls, none for streams and for calls that build graphs or ground truth: import,
autotune, harness create, trial run, profile activate), --api-key KEY or --api-key-file PATH
(env VECTORD_API_KEY, VECTORD_API_KEY_FILE: sent as `authorization: Bearer <key>`), --tls-ca PEM
(env VECTORD_TLS_CA: the CA of an https:// --server; default the system's roots),
--tls-client-cert PEM --tls-client-key PEM (env VECTORD_TLS_CLIENT_CERT, VECTORD_TLS_CLIENT_KEY:
a client certificate for an mTLS server).";

/// Exit code for Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug)]
pub struct CliError {
    pub code: Code,
    pub message: String,
}

impl CliError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    pub fn exit_code(&self) -> u8 {
        exit_code(self.code)
    }

    /// Prints the error on stderr and returns its exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("error: {}: {}", code_name(self.code), self.message);
        ExitCode::from(self.exit_code())
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let mut message = s.message().to_string();
        if message.is_empty() {
            message = s.code().description().to_string();
        }
        // Transport failures carry their cause in the source chain, not in the message.
        if let Some(src) = std::error::Error::source(&s) {
            message = format!("{message}: {}", chain(src));
        }
        CliError::new(s.code(), message)
    }
}

/// An error and its sources, joined with ": ".
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::NotFound => 3,
        Code::InvalidArgument | Code::OutOfRange => 4,
        Code::Unavailable | Code::DeadlineExceeded => 5,
        Code::FailedPrecondition | Code::Aborted => 6,
        Code::AlreadyExists => 7,
        Code::ResourceExhausted => 8,
        Code::Unauthenticated => 9,
        Code::PermissionDenied => 10,
        Code::Cancelled | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => {
            1
        }
    }
}

/// The canonical upper-case name of a gRPC code, e.g. `NOT_FOUND`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(exit_code(Code::NotFound), 3);
        assert_eq!(exit_code(Code::InvalidArgument), 4);
        assert_eq!(exit_code(Code::DeadlineExceeded), 5);
        assert_eq!(exit_code(Code::Aborted), 6);
        assert_eq!(exit_code(Code::AlreadyExists), 7);
        assert_eq!(exit_code(Code::ResourceExhausted), 8);
        assert_eq!(exit_code(Code::Unauthenticated), 9);
        assert_eq!(exit_code(Code::PermissionDenied), 10);
        assert_eq!(exit_code(Code::Internal), 1);
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }
}
