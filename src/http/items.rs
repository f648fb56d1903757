//! `GET /v1/collections/{collection}/items`: the `items` read over HTTP, Directus' REST shape
//! (`{"data":[…],"meta"?:{…}}`), under a subscriber credential: `Authorization: Bearer`
//! (or Directus' `?access_token=`) with a static token or a JWT, or, without one, the public
//! permissions where the auth mode has them (`--auth-mode public`). The read itself is the
//! socket's ([`crate::read`]); its errors keep their codes, with an HTTP status and the query
//! parameter at fault in `where`.
//!
//! Query parameters are Directus' REST ones, in the forms `@directus/sdk` sends: `fields` and
//! `sort` comma-separated, `filter` (and `deep`/`alias`, ignored) JSON-encoded, `limit`,
//! `offset`, `page` numbers, `search`, `meta` (`*`, `total_count`, `filter_count`, comma-
//! separated). `fields[]=…` may repeat. Other parameters are ignored, as Directus ignores
//! them; the bracket form of a filter (`filter[status][_eq]=…`) is refused with a pointer to
//! the JSON form.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::{ApiError, HttpState};
use crate::auth::Principal;
use crate::config::AuthMode;
use crate::read::{read, ReadRequest};

/// Parameters read as the query object's members (the rest are ignored).
const PARAMETERS: [&str; 9] = [
    "fields", "filter", "sort", "limit", "offset", "page", "search", "meta", "jsonpath",
];

/// `GET /v1/collections/{collection}/items`.
pub async fn read_handler(
    State(state): State<Arc<HttpState>>,
    Path(collection): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    match answer(&state, collection, raw.as_deref().unwrap_or(""), &headers).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn answer(
    state: &HttpState,
    collection: String,
    raw: &str,
    headers: &HeaderMap,
) -> Result<String, ApiError> {
    let (query, token) = parse_query(raw)?;
    let principal = reader(state, headers, token.as_deref()).await?;
    let view = read(
        state.state.as_ref(),
        &state.config,
        &principal,
        ReadRequest {
            collection,
            query: Some(query),
            ..ReadRequest::default()
        },
    )
    .map_err(|e| ApiError::Read {
        code: e.code,
        message: e.message,
        parameter: e.at,
    })?;
    let mut body = String::with_capacity(16 + view.data.len());
    body.push_str("{\"data\":");
    body.push_str(&view.data);
    if let Some(meta) = &view.meta {
        body.push_str(",\"meta\":");
        body.push_str(meta);
    }
    body.push('}');
    Ok(body)
}

/// Who reads: the bearer token's (or `access_token`'s) principal, else the public one where
/// the auth mode grants public permissions.
async fn reader(
    state: &HttpState,
    headers: &HeaderMap,
    access_token: Option<&str>,
) -> Result<Arc<Principal>, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            // The scheme is case-insensitive (RFC 9110); another scheme is no credential.
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_string())
        });
    let token = match (bearer, access_token) {
        (Some(Some(token)), _) => Some(token),
        (Some(None), _) => return Err(ApiError::ReaderUnauthorized),
        (None, token) => token.map(str::to_string),
    };
    match token {
        Some(token) => match state.auth.authenticate(&token).await {
            Ok(identity) => Ok(identity.principal),
            Err(e) => {
                // Which check failed is not told (see `AuthError`).
                tracing::debug!(error = %e, "items read: credential refused");
                Err(ApiError::ReaderUnauthorized)
            }
        },
        None if state.config.auth_mode == AuthMode::Public => Ok(state.auth.anonymous().clone()),
        None => Err(ApiError::ReaderUnauthorized),
    }
}

fn bad_parameter(parameter: &'static str, message: String) -> ApiError {
    ApiError::Read {
        code: crate::protocol::ErrorCode::InvalidQuery,
        message: format!("Invalid query. {message}"),
        parameter: Some(parameter),
    }
}

/// The query object (string members, as a REST query string gives them) and the
/// `access_token` parameter.
fn parse_query(raw: &str) -> Result<(Map<String, Value>, Option<String>), ApiError> {
    let mut query = Map::new();
    let mut token = None;
    let mut fields: Vec<Value> = Vec::new();
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
        let value = value.into_owned();
        match name.as_ref() {
            "access_token" => token = Some(value),
            "fields[]" => fields.push(Value::String(value)),
            name if name.starts_with("filter[") => {
                return Err(bad_parameter(
                    "filter",
                    "Send the filter as JSON: filter={\"field\":{\"_eq\":\"value\"}}, URL-encoded."
                        .to_string(),
                ))
            }
            name => {
                let Some(known) = PARAMETERS.iter().find(|p| **p == name) else {
                    continue;
                };
                if query.contains_key(*known) {
                    return Err(bad_parameter(
                        known,
                        format!("\"{known}\" is given more than once."),
                    ));
                }
                query.insert(name.to_string(), Value::String(value));
            }
        }
    }
    if !fields.is_empty() {
        if query.contains_key("fields") {
            return Err(bad_parameter(
                "fields",
                "\"fields\" is given more than once.".to_string(),
            ));
        }
        query.insert("fields".into(), Value::Array(fields));
    }
    Ok((query, token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_strings_become_the_query_object() {
        let (q, token) = parse_query(
            "fields=id,status&filter=%7B%22status%22%3A%7B%22_eq%22%3A%22open%22%7D%7D&sort=-id&limit=2&meta=*&access_token=t&deep=%7B%7D&other=1",
        )
        .unwrap();
        assert_eq!(
            Value::Object(q),
            json!({"fields":"id,status","filter":"{\"status\":{\"_eq\":\"open\"}}","sort":"-id","limit":"2","meta":"*"})
        );
        assert_eq!(token.as_deref(), Some("t"));
        let (q, _) = parse_query("fields[]=id&fields[]=text").unwrap();
        assert_eq!(Value::Object(q), json!({"fields":["id","text"]}));
        let err = parse_query("limit=1&limit=2").unwrap_err();
        assert!(matches!(
            err,
            ApiError::Read {
                parameter: Some("limit"),
                ..
            }
        ));
        let err = parse_query("filter[status][_eq]=open").unwrap_err();
        assert!(matches!(
            err,
            ApiError::Read {
                parameter: Some("filter"),
                ..
            }
        ));
    }
}
