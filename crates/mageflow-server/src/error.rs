//! The API's errors: every refusal is `{code, message, details}` with a stable `code`, mapped
//! from the engine's typed errors in one place ([`ApiError::from`]), with the HTTP status that
//! code calls for.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mageflow_engine::Error;
use serde::Serialize;
use serde_json::Value;

/// An error answered by the API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    #[schema(ignore)]
    pub status: StatusCode,
    /// Stable: see `docs/errors.md`.
    #[schema(value_type = String)]
    pub code: &'static str,
    pub message: String,
    /// Particulars: a refused bulk's items, for one.
    #[serde(skip_serializing_if = "Value::is_null")]
    #[schema(value_type = Object)]
    pub details: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

/// The status an engine error's code calls for: the caller's mistake (400), not there (404),
/// not now (409), the engine's trouble (500, 503).
fn status_of(code: &str) -> StatusCode {
    match code {
        "no_such_workflow" | "no_such_signature" => StatusCode::NOT_FOUND,
        "invalid_transition" | "canceled" | "not_yet" | "not_marked" | "not_expired" | "purged"
        | "already_exists" | "conflict" | "swarm_closed" | "swarm_full" | "stale_attempt" => {
            StatusCode::CONFLICT
        }
        "confirmation_required" => StatusCode::PRECONDITION_REQUIRED,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "shut_down" | "hot_tier" | "wait_timeout" => StatusCode::SERVICE_UNAVAILABLE,
        "store" | "corrupt_history" | "internal" | "needs_engine" | "lease_lost" => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let code = e.code();
        let details = match &e {
            Error::BulkRejected(rejected) => serde_json::to_value(rejected).unwrap_or_default(),
            _ => Value::Null,
        };
        Self {
            status: status_of(code),
            code,
            message: e.to_string(),
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "http: request failed");
        }
        (self.status, Json(self)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_the_status_their_code_calls_for() {
        let cases = [
            ("no_such_workflow", 404),
            ("invalid_transition", 409),
            ("confirmation_required", 428),
            ("too_large", 413),
            ("invalid_definition", 400),
            ("store", 500),
            ("shut_down", 503),
        ];
        for (code, status) in cases {
            assert_eq!(status_of(code).as_u16(), status, "{code}");
        }
    }
}
