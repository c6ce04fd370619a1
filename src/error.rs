//! The one place where failures become HTTP responses.
//!
//! Owns `ApiError` (`{"errcode": "M_...", "error": "..."}` plus a status) and its
//! `IntoResponse`. Handlers return `Result<_, ApiError>`; lower layers keep their own
//! error enums and are converted here. Internal details (paths, RocksDB messages) are
//! logged, never sent to the peer. Nothing here may panic.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A Matrix error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429s).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            errcode,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", m)
    }
    pub fn not_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", m)
    }
    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", m)
    }
    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "missing access token",
        )
    }
    pub fn unknown_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "unrecognised access token",
        )
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", m)
    }
    pub fn unrecognized() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
            "unrecognized request",
        )
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_UNRECOGNIZED",
            "method not allowed on this endpoint",
        )
    }
    pub fn limit_exceeded(m: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", m);
        e.retry_after = Some(retry_after_secs);
        e
    }
    /// A failure on our side; the detail goes to the log, the peer gets a generic text.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error on the request path");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "internal server error",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.errcode,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"errcode": self.errcode, "error": self.message});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// Maps axum's JSON body rejections to the Matrix codes.
impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection::*;
        match r {
            JsonSyntaxError(e) => ApiError::not_json(e.body_text()),
            JsonDataError(e) => ApiError::bad_json(e.body_text()),
            MissingJsonContentType(_) => {
                ApiError::not_json("expected Content-Type: application/json")
            }
            BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::too_large("request body too large")
            }
            other => ApiError::bad_json(other.body_text()),
        }
    }
}

/// Fallback for unknown paths under `/_matrix`; logged, so an operator (and the
/// interop tests) can see what a peer asked that courier does not serve.
pub async fn unrecognized(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    tracing::info!(%method, path = %uri.path(), "unrecognized request");
    ApiError::unrecognized()
}

/// `route` with a wrong method answered in Matrix form (405 `M_UNRECOGNIZED`, as
/// JSON) instead of axum's empty 405.
pub fn matrix<S: Clone + Send + Sync + 'static>(
    route: axum::routing::MethodRouter<S>,
) -> axum::routing::MethodRouter<S> {
    route.fallback(|| async { ApiError::method_not_allowed() })
}

/// An error and its causes on one line (reqwest keeps the useful part in `source`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
