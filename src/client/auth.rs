//! Who is calling: the access-token extractor of the client-server API.
//!
//! Owns the token's transport rules: `Authorization: Bearer <token>` (preferred), or
//! the deprecated `access_token` query parameter, never both at once. No token is 401
//! `M_MISSING_TOKEN`; a token no device owns is 401 `M_UNKNOWN_TOKEN`. The lookup is
//! one read of the hashed-token index (`store::accounts`).
//!
//! It must never log a token, nor decide what the caller may do: handlers do.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use percent_encoding::percent_decode_str;

use crate::app::App;
use crate::error::ApiError;

/// The device an access token belongs to. Put it first among a handler's arguments so
/// an unauthenticated request is refused before anything else is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub user_id: String,
    pub device_id: String,
}

impl FromRequestParts<App> for Device {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let header = match parts.headers.get(AUTHORIZATION) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| malformed_header())?),
        };
        let token = token_from(header, parts.uri.query())?;
        match app.store.token_owner(&token)? {
            Some((user_id, device_id)) => Ok(Device { user_id, device_id }),
            None => Err(ApiError::unknown_token()),
        }
    }
}

fn malformed_header() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
        "the Authorization header is not `Bearer <access token>`",
    )
}

/// The access token of a request, from its `Authorization` header value or its query
/// string. The scheme name is case-insensitive (RFC 9110); anything but one Bearer
/// token counts as no token, as Synapse does.
pub fn token_from(header: Option<&str>, query: Option<&str>) -> Result<String, ApiError> {
    let from_query = query.and_then(query_token);
    match (header, from_query) {
        (Some(_), Some(_)) => Err(ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "give the access token either in the Authorization header or in the query, not both",
        )),
        (Some(h), None) => {
            let (scheme, token) = h.trim().split_once(' ').ok_or_else(malformed_header)?;
            let token = token.trim();
            if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
                return Err(malformed_header());
            }
            Ok(token.to_owned())
        }
        (None, Some(t)) if !t.is_empty() => Ok(t),
        (None, _) => Err(ApiError::missing_token()),
    }
}

/// The percent-decoded value of the first `access_token` parameter.
fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == "access_token").then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<String, ApiError>) -> &'static str {
        r.err().map(|e| e.errcode).unwrap_or("OK")
    }

    #[test]
    fn header_and_query_tokens() {
        assert_eq!(token_from(Some("Bearer abc"), None).unwrap(), "abc");
        assert_eq!(token_from(Some("bearer  abc "), None).unwrap(), "abc");
        assert_eq!(
            token_from(None, Some("x=1&access_token=a%2Bb")).unwrap(),
            "a+b"
        );
        assert_eq!(
            token_from(None, Some("since=s1")).err().unwrap().errcode,
            "M_MISSING_TOKEN"
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "abc"] {
            assert_eq!(
                code(token_from(Some(bad), None)),
                "M_MISSING_TOKEN",
                "{bad}"
            );
        }
        assert_eq!(code(token_from(None, None)), "M_MISSING_TOKEN");
        assert_eq!(
            code(token_from(None, Some("access_token="))),
            "M_MISSING_TOKEN"
        );
        assert_eq!(
            code(token_from(Some("Bearer abc"), Some("access_token=abc"))),
            "M_MISSING_TOKEN",
            "both at once is refused"
        );
    }
}
