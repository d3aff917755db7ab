//! The job's shared token: every RPC carries it as `authorization: Bearer <token>`.

use std::path::Path;
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

/// A server interceptor that rejects calls without the right token.
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
            Err(Status::unauthenticated("missing or wrong job token"))
        }
    }
}

/// A client interceptor that adds the token to every call.
#[derive(Debug, Clone)]
pub struct AttachToken(MetadataValue<Ascii>);

/// The interceptor that sends `token` with every call.
pub fn attach_token(token: &str) -> AttachToken {
    AttachToken(
        format!("Bearer {token}")
            .parse()
            .expect("printable ASCII tokens are valid metadata"),
    )
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
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
