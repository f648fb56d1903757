//! Encoding of server frames, in Directus' key order.

use super::{json_string, ErrorCode, Uid, WirePosition};

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

/// `{"type":"items","data":<data>,"meta"?:<meta>,"uid"?}`: the answer to an `items` read
/// (`data` and `meta` raw JSON; the uid echoed with its original type).
pub fn items_frame(data: &str, meta: Option<&str>, uid: Option<&Uid>) -> String {
    let mut out = String::with_capacity(32 + data.len());
    out.push_str(r#"{"type":"items","data":"#);
    out.push_str(data);
    if let Some(meta) = meta {
        out.push_str(",\"meta\":");
        out.push_str(meta);
    }
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

/// `{"type":"subscription","event":"init","data"?:<data>,"meta"?:<meta>,"uid"?:"U",
/// "position":P,"recovered"?:bool}`; `data` and `meta` are raw JSON (`meta`: the counts
/// `query.meta` asked, where Directus puts them). `recovered` answers a `since`.
pub fn init_frame(
    data: Option<&str>,
    meta: Option<&str>,
    uid: Option<&str>,
    position: &WirePosition,
    recovered: Option<bool>,
) -> String {
    let mut out = match meta {
        None => subscription_frame("init", data, uid, Some(position)),
        Some(meta) => {
            let mut with_meta = data.unwrap_or("[]").to_string();
            with_meta.push_str(",\"meta\":");
            with_meta.push_str(meta);
            subscription_frame("init", Some(&with_meta), uid, Some(position))
        }
    };
    if let Some(recovered) = recovered {
        out.pop();
        out.push_str(",\"recovered\":");
        out.push_str(if recovered { "true" } else { "false" });
        out.push('}');
    }
    out
}

/// `{"type":"subscription","event":E,"data"?:<data>,"uid"?:"U","position"?:P}`; `data` is raw
/// JSON and the uid is always a JSON string here (Directus sends `String(uid)` in
/// subscription frames). `position` is the Tidings extension, last so that a Directus frame
/// is a prefix of ours.
pub fn subscription_frame(
    event: &str,
    data: Option<&str>,
    uid: Option<&str>,
    position: Option<&WirePosition>,
) -> String {
    event_frame(event, data, uid, None, position)
}

/// [`subscription_frame`] with the Tidings `cause` (`"enter"`/`"leave"`, a transition on a
/// retained collection) between `uid` and `position`.
pub fn event_frame(
    event: &str,
    data: Option<&str>,
    uid: Option<&str>,
    cause: Option<&str>,
    position: Option<&WirePosition>,
) -> String {
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
    if let Some(cause) = cause {
        out.push_str(",\"cause\":\"");
        out.push_str(cause);
        out.push('"');
    }
    if let Some(position) = position {
        out.push_str(",\"position\":");
        out.push_str(&position.to_json());
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
        let at = WirePosition {
            epoch: "e1".into(),
            offset: 7,
        };
        assert_eq!(
            init_frame(Some("[]"), None, Some("42"), &at, None),
            r#"{"type":"subscription","event":"init","data":[],"uid":"42","position":{"epoch":"e1","offset":7}}"#
        );
        assert_eq!(
            init_frame(None, None, Some("x\"y"), &at, Some(true)),
            r#"{"type":"subscription","event":"init","uid":"x\"y","position":{"epoch":"e1","offset":7},"recovered":true}"#
        );
        assert_eq!(
            init_frame(Some("[]"), Some(r#"{"total_count":0}"#), None, &at, None),
            r#"{"type":"subscription","event":"init","data":[],"meta":{"total_count":0},"position":{"epoch":"e1","offset":7}}"#
        );
        assert_eq!(
            items_frame(r#"[{"id":1}]"#, Some(r#"{"filter_count":1}"#), Some(&num)),
            r#"{"type":"items","data":[{"id":1}],"meta":{"filter_count":1},"uid":42}"#
        );
        assert_eq!(
            subscription_frame("delete", Some(r#"["5"]"#), None, None),
            r#"{"type":"subscription","event":"delete","data":["5"]}"#
        );
    }
}
