//! Encoding of server frames, in Directus' key order.

use super::{json_string, ErrorCode, Uid};

fn uid_suffix(out: &mut String, uid: Option<&Uid>) {
    if let Some(uid) = uid {
        out.push_str(",\"uid\":");
        out.push_str(&uid.to_json());
    }
}

/// `{"type":"auth","status":"ok","uid"?}`.
pub fn auth_ok(uid: Option<&Uid>) -> String {
    let mut out = String::from(r#"{"type":"auth","status":"ok""#);
    uid_suffix(&mut out, uid);
    out.push('}');
    out
}

/// `{"type":T,"status":"error","error":{"code":C,"message":M},"uid"?}`.
pub fn error_frame(kind: &str, code: ErrorCode, message: &str, uid: Option<&Uid>) -> String {
    let mut out = format!(
        r#"{{"type":{},"status":"error","error":{{"code":"{}","message":{}}}"#,
        json_string(kind),
        code.as_str(),
        json_string(message)
    );
    uid_suffix(&mut out, uid);
    out.push('}');
    out
}

/// `{"type":"pong","uid"?}`.
pub fn pong(uid: Option<&Uid>) -> String {
    let mut out = String::from(r#"{"type":"pong""#);
    uid_suffix(&mut out, uid);
    out.push('}');
    out
}

/// The server heartbeat `{"type":"ping"}`.
pub fn server_ping() -> &'static str {
    r#"{"type":"ping"}"#
}

/// `{"type":"subscription","event":"unsubscribe","uid"?}` (uid with its original type).
pub fn unsubscribe_ack(uid: Option<&Uid>) -> String {
    let mut out = String::from(r#"{"type":"subscription","event":"unsubscribe""#);
    uid_suffix(&mut out, uid);
    out.push('}');
    out
}

/// `{"type":"subscription","event":"init","data"?:<data>,"uid"?:"U"}`; `data` is raw JSON.
pub fn init_frame(data: Option<&str>, uid: Option<&str>) -> String {
    subscription_frame("init", data, uid)
}

/// `{"type":"subscription","event":E,"data"?:<data>,"uid"?:"U"}`; `data` is raw JSON and the
/// uid is always a JSON string here (Directus sends `String(uid)` in subscription frames).
pub fn subscription_frame(event: &str, data: Option<&str>, uid: Option<&str>) -> String {
    let mut out = String::with_capacity(48 + data.map_or(0, str::len) + uid.map_or(0, str::len));
    out.push_str(r#"{"type":"subscription","event":""#);
    out.push_str(event);
    out.push('"');
    if let Some(data) = data {
        out.push_str(",\"data\":");
        out.push_str(data);
    }
    if let Some(uid) = uid {
        out.push_str(",\"uid\":");
        out.push_str(&json_string(uid));
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_match_directus_bytes() {
        let num = Uid::from_value(&json!(42)).unwrap();
        let s = Uid::from_value(&json!("auth-1")).unwrap();
        assert_eq!(auth_ok(None), r#"{"type":"auth","status":"ok"}"#);
        assert_eq!(
            auth_ok(Some(&num)),
            r#"{"type":"auth","status":"ok","uid":42}"#
        );
        assert_eq!(pong(Some(&s)), r#"{"type":"pong","uid":"auth-1"}"#);
        assert_eq!(
            unsubscribe_ack(Some(&num)),
            r#"{"type":"subscription","event":"unsubscribe","uid":42}"#
        );
        assert_eq!(
            error_frame(
                "auth",
                ErrorCode::AuthFailed,
                "Authentication handshake failed.",
                None
            ),
            r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication handshake failed."}}"#
        );
        assert_eq!(
            init_frame(Some("[]"), Some("42")),
            r#"{"type":"subscription","event":"init","data":[],"uid":"42"}"#
        );
        assert_eq!(
            init_frame(None, Some("x\"y")),
            r#"{"type":"subscription","event":"init","uid":"x\"y"}"#
        );
        assert_eq!(
            subscription_frame("delete", Some(r#"["5"]"#), None),
            r#"{"type":"subscription","event":"delete","data":["5"]}"#
        );
    }
}
