//! Errors in OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`) with the
//! HTTP status OpenAI uses for each, because clients branch on both.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, …
    pub kind: &'static str,
    /// The request field at fault, as a path (`messages[0].content`).
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::invalid(message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::invalid(message).with_status(StatusCode::NOT_FOUND)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            kind: "rate_limit_error",
            ..Self::invalid(message)
                .with_status(StatusCode::TOO_MANY_REQUESTS)
                .with_code("queue_full")
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            kind: "server_error",
            ..Self::invalid(message).with_status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An engine error as the client should see it: its own mistakes are 400s, ours are 500s.
impl From<longctx::Error> for ApiError {
    fn from(e: longctx::Error) -> Self {
        use longctx::Error as E;
        match &e {
            E::ContextOverflow { .. } | E::PolicyOverflow { .. } => {
                ApiError::invalid(e.to_string()).with_code("context_length_exceeded")
            }
            E::InvalidOption(_)
            | E::InvalidSpec { .. }
            | E::UnknownMethod { .. }
            | E::EmptyPrompt
            | E::BadToken { .. }
            | E::Tokenizer(_)
            | E::ChatTemplate(_)
            | E::ContextTooLarge { .. } => ApiError::invalid(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}
