//! The job's shared token: every RPC carries it as `authorization: Bearer <token>`.
//! A registered member (or learner rank) also carries the session secret the learner gave
//! it, as `x-quill-session: <secret>`, which binds it to its member id and role.

use rand::RngCore;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The environment variable that holds the token when no token file is given.
pub const TOKEN_ENV: &str = "QUILL_TOKEN";

/// Why no usable token was found.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be read.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Neither a file nor the environment gave a token.
    #[error("no job token: give a token file or set {TOKEN_ENV}")]
    Missing,
    /// The token is empty or not printable ASCII.
    #[error("the job token must be non-empty printable ASCII")]
    Malformed,
}

/// Reads the token from `file`, else from `$QUILL_TOKEN`.
pub fn load_token(file: Option<&Path>) -> Result<String, AuthError> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|source| AuthError::Io {
            path: path.display().to_string(),
            source,
        })?,
        None => std::env::var(TOKEN_ENV).map_err(|_| AuthError::Missing)?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// The metadata entry that carries a member's (or rank's) session secret.
pub const SESSION_HEADER: &str = "x-quill-session";

/// Calls this process refused for a missing or wrong job token.
static REFUSED_TOKENS: AtomicU64 = AtomicU64::new(0);

/// How many calls this process's servers refused for a missing or wrong job token.
pub fn refused_token_calls() -> u64 {
    REFUSED_TOKENS.load(Ordering::Relaxed)
}

/// A server interceptor that rejects calls without the right token (counted, see
/// [`refused_token_calls`]).
pub fn require_token(token: String) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let expected = format!("Bearer {token}");
    move |request: Request<()>| {
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if constant_time_eq(given, expected.as_bytes()) {
            Ok(request)
        } else {
            REFUSED_TOKENS.fetch_add(1, Ordering::Relaxed);
            Err(Status::unauthenticated("missing or wrong job token"))
        }
    }
}

/// A new session secret: 32 random bytes as 64 hex digits.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session secret a call carries (empty when it carries none).
pub fn session_of<T>(request: &Request<T>) -> &str {
    request
        .metadata()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Whether `given` is the session secret `expected` (in constant time; an empty secret
/// never matches).
pub fn session_matches(given: &str, expected: &str) -> bool {
    !expected.is_empty() && constant_time_eq(given.as_bytes(), expected.as_bytes())
}

/// A client interceptor that adds the token, and the session secret once there is one,
/// to every call.
#[derive(Debug, Clone)]
pub struct AttachToken {
    token: MetadataValue<Ascii>,
    session: Option<MetadataValue<Ascii>>,
}

/// The interceptor that sends `token` with every call.
pub fn attach_token(token: &str) -> AttachToken {
    AttachToken {
        token: format!("Bearer {token}")
            .parse()
            .expect("printable ASCII tokens are valid metadata"),
        session: None,
    }
}

/// The interceptor that sends `token` and the session secret `session` with every call
/// (a secret that is not printable ASCII is not sent, and the server refuses the calls).
pub fn attach_session(token: &str, session: &str) -> AttachToken {
    AttachToken {
        session: session.parse().ok(),
        ..attach_token(token)
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert("authorization", self.token.clone());
        if let Some(session) = &self.session {
            metadata.insert(SESSION_HEADER, session.clone());
        }
        Ok(request)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks() {
        let check = require_token("s3cret".into());
        let mut attach = attach_token("s3cret");
        assert!(check(attach.call(Request::new(())).unwrap()).is_ok());
        let mut wrong = attach_token("other");
        let refused = check(wrong.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(check(Request::new(())).is_err());
    }

    #[test]
    fn sessions_ride_along_and_must_match() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, new_secret());
        let request = attach_session("t", &secret).call(Request::new(())).unwrap();
        assert_eq!(session_of(&request), secret);
        assert!(session_matches(session_of(&request), &secret));
        assert!(!session_matches(session_of(&request), &new_secret()));
        let plain = attach_token("t").call(Request::new(())).unwrap();
        assert_eq!(session_of(&plain), "");
        assert!(!session_matches("", ""));
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(load_token(Some(&path)).unwrap(), "abc123");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(load_token(Some(&path)), Err(AuthError::Malformed)));
        let err = load_token(Some(&dir.path().join("none")))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("token file"), "{err}");
    }
}
