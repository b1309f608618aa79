//! Errors as the OpenAI API spells them: a status code and
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answered to the client. Built by the handlers from bad input, overload or an engine
/// failure; turned into a response with the OpenAI error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorDetail,
}

/// The object under `"error"` in an OpenAI error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: &'a ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorDetail {
                message: message.into(),
                kind,
                param: None,
                code: None,
            },
        }
    }

    /// 400: the request is malformed or asks for something this server cannot do.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one field of the request.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_request(message).with_param(param)
    }

    /// 404 for a `model` this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        let mut error = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model");
        error.body.code = Some("model_not_found");
        error
    }

    /// 404 for a path this server does not answer.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("There is no route {path}."),
        )
    }

    /// 405 for a route asked with the wrong method.
    pub fn method_not_allowed(path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{path} does not take this method."),
        )
    }

    /// 413 for a body over the configured limit.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
    }

    /// 429: the pending-request limit is reached; the client should retry later.
    pub fn overloaded(limit: usize) -> Self {
        let mut error = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "The server is at its limit of {limit} pending requests; retry after a \
                 request finishes."
            ),
        );
        error.body.code = Some("rate_limit_exceeded");
        error
    }

    /// 500: the engine failed; nothing the client can change.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 503: the engine has stopped and takes no more requests.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.body.param = Some(param.to_owned());
        self
    }

    /// The body as JSON text, `{"error": {...}}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&ErrorEnvelope { error: &self.body })
            .unwrap_or_else(|_| String::from(r#"{"error":{"message":"unprintable error"}}"#))
    }
}

impl From<pagoda_engine::Error> for ApiError {
    fn from(error: pagoda_engine::Error) -> Self {
        match error {
            // The engine's sentence already says what was wrong; the prefix would repeat it.
            pagoda_engine::Error::InvalidRequest(message) => Self::invalid_request(message),
            pagoda_engine::Error::Stopped => {
                Self::unavailable("The engine has stopped and takes no more requests.")
            }
            other => Self::internal(other.to_string()),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.body.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.to_json();
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_has_the_openai_shape() {
        let error = ApiError::invalid_param("n", "n must be 1");
        let json: serde_json::Value = serde_json::from_str(&error.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": {
                "message": "n must be 1",
                "type": "invalid_request_error",
                "param": "n",
                "code": null,
            }})
        );
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn engine_errors_map_to_client_and_server_faults() {
        let bad: ApiError =
            pagoda_engine::Error::InvalidRequest("the prompt is empty".into()).into();
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.body.message, "the prompt is empty");
        let internal: ApiError = pagoda_engine::Error::Internal("lost".into()).into();
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.body.kind, "server_error");
        let stopped: ApiError = pagoda_engine::Error::Stopped.into();
        assert_eq!(stopped.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            ApiError::overloaded(4).status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
