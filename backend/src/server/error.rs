//! One error type for the HTTP layer, answered as `ApiError { code, message }` with a status.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use shared::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Engine(#[from] crate::Error),
    #[error("unknown model {0:?}; GET /api/models lists the loaded models")]
    UnknownModel(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("all generation workers are busy and the queue is full; retry in a few seconds")]
    Busy,
    #[error("too many requests from this client; retry in {0} s")]
    RateLimited(u64),
    #[error("the {} neuron map of {model} {}; retry in a few seconds", view.as_str(), match permille {
        Some(p) => format!("is being built: {}% done", p / 10),
        None => "waits for another map's build to finish".into(),
    })]
    MapBuilding { model: String, view: shared::View, permille: Option<usize> },
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("method not allowed here; allowed: {0}")]
    MethodNotAllowed(&'static str),
    /// The client closed its connection; nobody reads this answer (logged as 499).
    #[error("the client went away")]
    ClientGone,
    #[error("internal error")]
    Internal(String),
}

/// nginx's "client closed request": recorded in logs and metrics, never read by anyone.
pub const CLIENT_GONE: u16 = 499;

impl ServerError {
    pub fn code(&self) -> &'static str {
        use crate::Error as E;
        match self {
            ServerError::Engine(E::BadInput(_) | E::Template(_) | E::Tokenizer(_)) => "bad_input",
            ServerError::Engine(E::TooLarge(_)) => "too_large",
            ServerError::Engine(E::UnknownToken(_)) => "unknown_token",
            ServerError::Engine(E::NonFinite(_)) => "non_finite",
            ServerError::Engine(E::OverBudget(_)) => "over_budget",
            ServerError::Engine(E::Cancelled) | ServerError::ClientGone => "client_gone",
            ServerError::Engine(_) => "internal",
            ServerError::UnknownModel(_) => "unknown_model",
            ServerError::BadRequest(_) => "bad_request",
            ServerError::NotFound(_) => "not_found",
            ServerError::Busy => "busy",
            ServerError::RateLimited(_) => "rate_limited",
            ServerError::MapBuilding { .. } => "map_building",
            ServerError::BodyTimeout(_) => "body_timeout",
            ServerError::MethodNotAllowed(_) => "method_not_allowed",
            ServerError::Internal(_) => "internal",
        }
    }
}

impl ServerError {
    /// The message a client sees: internal details go to the log, not to strangers.
    pub fn public_message(&self) -> String {
        if self.status_code() == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("internal error: {self:?}");
            "internal error; see the server log".to_owned()
        } else {
            self.to_string()
        }
    }
}

impl ResponseError for ServerError {
    fn status_code(&self) -> StatusCode {
        use crate::Error as E;
        match self {
            // Template and tokenizer errors come from what the user sent (e.g. a chat template's
            // raise_exception on a malformed conversation).
            ServerError::Engine(E::BadInput(_) | E::Template(_) | E::Tokenizer(_)) | ServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServerError::Engine(E::TooLarge(_) | E::OverBudget(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            ServerError::Engine(E::UnknownToken(_) | E::NonFinite(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            ServerError::Engine(E::Cancelled) | ServerError::ClientGone => StatusCode::from_u16(CLIENT_GONE).unwrap_or(StatusCode::BAD_REQUEST),
            ServerError::MapBuilding { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ServerError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServerError::UnknownModel(_) | ServerError::NotFound(_) => StatusCode::NOT_FOUND,
            ServerError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ServerError::Engine(_) | ServerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let message = self.public_message();
        let mut resp = HttpResponse::build(status);
        let mut progress = None;
        match self {
            ServerError::Busy => {
                resp.insert_header((header::RETRY_AFTER, "2"));
            }
            ServerError::MapBuilding { permille, .. } => {
                resp.insert_header((header::RETRY_AFTER, "2"));
                progress = Some((permille.unwrap_or(0) / 10).min(100) as u8);
            }
            ServerError::RateLimited(s) => {
                resp.insert_header((header::RETRY_AFTER, s.to_string()));
            }
            ServerError::MethodNotAllowed(allow) => {
                resp.insert_header((header::ALLOW, *allow));
            }
            // The rest of a slow body is not read: close the connection after this answer.
            ServerError::BodyTimeout(_) => {
                resp.force_close();
            }
            _ => {}
        }
        resp.json(ApiError { code: self.code().into(), message, progress })
    }
}
