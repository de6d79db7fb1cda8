//! Who may call the admin API: with a token set, every request but
//! `GET /api/health` and the console's own files (which hold no data) must
//! carry `Authorization: Bearer TOKEN` (compared in constant time); and no
//! request may announce a body larger than [`MAX_BODY_BYTES`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Most bytes of a request body; a larger one is refused with 413.
pub const MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;

/// The admin token, kept as its SHA-256 so that comparing it takes the same
/// time whatever the length or content of what a client sends.
#[derive(Clone)]
pub struct Token(Option<Arc<[u8; 32]>>);

impl Token {
    /// `Some(token)` protects the API; `None` leaves it open (loopback only).
    pub fn new(token: Option<&str>) -> Token {
        Token(token.map(|token| Arc::new(digest(token.as_bytes()))))
    }

    /// Whether an `Authorization` header value carries the token.
    fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(expected) = &self.0 else {
            return true;
        };
        let presented = authorization
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        bool::from(digest(presented).ct_eq(expected.as_ref()))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The middleware: refuses oversized bodies (413) and, when a token is
/// set, requests without it (401); `/api/health` and the console's files
/// are always open.
pub async fn guard(State(token): State<Token>, request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|bytes| bytes > MAX_BODY_BYTES) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        )
            .into_response();
    }
    let open = matches!(
        request.uri().path(),
        "/api/health" | "/" | "/console.js" | "/console.css"
    );
    if !open && !token.admits(request.headers().get(header::AUTHORIZATION)) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"ksm\"")],
            "this admin API needs `Authorization: Bearer TOKEN` (the token of admin.token_file \
             or KSM_ADMIN_TOKEN)",
        )
            .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_is_admitted() {
        let token = Token::new(Some("s3cret-token-0123456789"));
        let header = |text: &str| HeaderValue::from_str(text).expect("a header value");
        assert!(token.admits(Some(&header("Bearer s3cret-token-0123456789"))));
        assert!(!token.admits(Some(&header("Bearer s3cret-token-012345678"))));
        assert!(!token.admits(Some(&header("s3cret-token-0123456789"))));
        assert!(!token.admits(Some(&header("Bearer "))));
        assert!(!token.admits(None));
        assert!(Token::new(None).admits(None));
    }
}
