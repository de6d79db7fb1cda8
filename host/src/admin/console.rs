//! The console: a web page over the admin API, shipped inside the binary
//! (plain HTML, CSS and JavaScript; nothing is fetched from elsewhere).
//! Its files are open to all, as they hold no data: the page asks for the
//! admin token, keeps it in the browser's session (never in a URL) and
//! sends it with each API call.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");
/// The page loads only its own script and style, and talks only to its own origin.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`.
pub async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

/// `GET /console.js`.
pub async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console.css`.
pub async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
