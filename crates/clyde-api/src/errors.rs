//! OCI error bodies.

use http::{HeaderValue, Response, StatusCode, header};

use crate::{Body, full};

/// OCI distribution error codes Clyde answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    ManifestUnknown,
    NameInvalid,
    TagInvalid,
    DigestInvalid,
    RangeInvalid,
    Unsupported,
    TooManyRequests,
    Unauthorized,
    Denied,
    Unknown,
}

impl ErrorCode {
    /// The code as it appears in the body.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::TagInvalid => "TAG_INVALID",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::RangeInvalid => "RANGE_INVALID",
            Self::TooManyRequests => "TOOMANYREQUESTS",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::Unsupported => "UNSUPPORTED",
            Self::Unknown => "UNKNOWN",
        }
    }
}

/// An answer with an OCI error body.
pub(crate) fn answer(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "errors": [{ "code": code.as_str(), "message": message }] });
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut r = Response::new(full(bytes.clone()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    r
}
