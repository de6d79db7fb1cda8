//! Device and home events: payload validation and the MODE Event JSON.
//!
//! Order of checks, so that a malformed event is an error whatever the
//! subscription, while an unsubscribed event costs nothing more:
//! 1. the payload is JSON (else `invalid-event-json`) and an object (else
//!    `invalid-event-json` at the offset of its first byte);
//! 2. `eventType` is a non-empty string (else `invalid-field`);
//! 3. the subscription: not subscribed → no record;
//! 4. `eventData` is an object and the home ID is known (else `invalid-field`);
//!    `timestamp` never fails: an invalid one is replaced by `received-at`.
//!
//! No tree is built: the payload is scanned once ([`crate::json`]) and
//! `eventData` goes into the record as its bytes were sent, only the
//! whitespace between its tokens removed (numbers, escapes, key order and
//! duplicate keys as the device wrote them). A member given twice at the top
//! level counts once, with its last value.

use std::borrow::Cow;

use crate::error::Error;
use crate::json::{self, Kind, Member};
use crate::timestamp::is_rfc3339;

/// Where a device event came from (the WIT `device-context`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceContext {
    /// Device that published the event (from the topic).
    pub device_id: u64,
    /// Home of the device from the registry; `None`: the payload's `homeId`.
    pub home_id: Option<u64>,
    /// Device class from the registry (`originDeviceClass`).
    pub device_class: Option<String>,
    /// Device IP address, when known (`originDeviceIp`).
    pub device_ip: Option<String>,
    /// Time the host received the event, RFC 3339.
    pub received_at: String,
}

/// Where a home event came from (the WIT `home-context`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HomeContext {
    /// Home the event belongs to (from the topic).
    pub home_id: u64,
    /// Project API key ID that sent the event (`originProjectKeyId`).
    pub project_key_id: Option<String>,
    /// Project API key name that sent the event (`originProjectKeyName`).
    pub project_key_name: Option<String>,
    /// Time the host received the event, RFC 3339.
    pub received_at: String,
}

/// The source of an event and what it contributes to the MODE Event.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Published by a device to `/devices/{id}/event`.
    Device(&'a DeviceContext),
    /// Published for a home to `/homes/{id}/event`.
    Home(&'a HomeContext),
}

impl Origin<'_> {
    /// Time the host received the event.
    fn received_at(&self) -> &str {
        match self {
            Origin::Device(c) => &c.received_at,
            Origin::Home(c) => &c.received_at,
        }
    }
}

/// A validated event payload whose subscription is still to be checked.
#[derive(Debug)]
pub struct Payload<'a> {
    event_type: Cow<'a, str>,
    /// `eventData`, `timestamp` and `homeId` as sent (the last of each).
    event_data: Option<Member<'a>>,
    timestamp: Option<&'a str>,
    home_id: Option<&'a str>,
    /// The payload's length: about what the MODE Event needs beside the
    /// fields ksm adds.
    len: usize,
}

impl<'a> Payload<'a> {
    /// Checks steps 1 and 2 (JSON object, non-empty string `eventType`).
    pub fn parse(payload: &'a [u8]) -> Result<Self, Error> {
        let (mut event_type, mut event_data, mut timestamp, mut home_id) = (None, None, None, None);
        let kind = json::scan(payload, |member| {
            if member.key_is("eventType") {
                event_type = Some(member.value);
            } else if member.key_is("eventData") {
                event_data = Some(member);
            } else if member.key_is("timestamp") {
                timestamp = Some(member.value);
            } else if member.key_is("homeId") {
                home_id = Some(member.value);
            }
        })
        .map_err(|fault| syntax_error(payload, fault))?;
        if kind != Kind::Object {
            return Err(Error::InvalidEventJson {
                offset: payload
                    .iter()
                    .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(0) as u64,
                detail: format!("expected a JSON object, found {}", kind.name()),
            });
        }
        let event_type = match event_type.map(|raw| (raw, Kind::of(raw))) {
            Some((raw, Kind::String)) => decode_string(raw)?,
            Some((_, kind)) => {
                return Err(Error::invalid_field(
                    "eventType",
                    format!("must be a string, found {}", kind.name()),
                ));
            }
            None => return Err(Error::invalid_field("eventType", "missing")),
        };
        if event_type.is_empty() {
            return Err(Error::invalid_field("eventType", "must not be empty"));
        }
        Ok(Payload {
            event_type,
            event_data,
            timestamp,
            home_id,
            len: payload.len(),
        })
    }

    /// The event's type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// Checks step 4 and builds the MODE Event JSON, compact, with its keys in
    /// this order: `eventType`, `eventData`, `timestamp`, `homeId`, then
    /// `originDeviceId`, `originDeviceClass`, `originDeviceIp` (device events)
    /// or `originProjectKeyId`, `originProjectKeyName` (home events), each
    /// when known. Other payload fields are dropped.
    pub fn into_mode_event(self, origin: Origin<'_>) -> Result<Vec<u8>, Error> {
        let event_data = match self.event_data {
            Some(data) if Kind::of(data.value) == Kind::Object => data,
            Some(data) => {
                return Err(Error::invalid_field(
                    "eventData",
                    format!("must be an object, found {}", Kind::of(data.value).name()),
                ));
            }
            None => return Err(Error::invalid_field("eventData", "missing")),
        };
        let home_id = match origin {
            Origin::Device(c) => match (c.home_id, self.home_id) {
                (Some(id), _) => id,
                (None, Some(raw)) => non_negative_integer(raw).ok_or_else(|| {
                    Error::invalid_field(
                        "homeId",
                        format!("must be a non-negative integer, found {raw}"),
                    )
                })?,
                (None, None) => {
                    return Err(Error::invalid_field(
                        "homeId",
                        format!(
                            "device {} is not in the device registry and the event carries no homeId",
                            c.device_id
                        ),
                    ));
                }
            },
            Origin::Home(c) => c.home_id,
        };
        let sent_timestamp = match self.timestamp {
            Some(raw) if Kind::of(raw) == Kind::String => Some(decode_string(raw)?),
            _ => None,
        };
        let timestamp = match &sent_timestamp {
            Some(t) if is_rfc3339(t) => t,
            _ => origin.received_at(),
        };

        let mut out = Vec::with_capacity(self.len + 192);
        out.extend_from_slice(b"{\"eventType\":");
        json::push_string(&mut out, &self.event_type);
        out.extend_from_slice(b",\"eventData\":");
        json::push_compact(&mut out, event_data.value, event_data.compact);
        out.extend_from_slice(b",\"timestamp\":");
        json::push_string(&mut out, timestamp);
        push_integer(&mut out, "homeId", home_id);
        let optional = |out: &mut Vec<u8>, key: &str, value: &Option<String>| {
            if let Some(value) = value {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
                json::push_string(out, value);
            }
        };
        match origin {
            Origin::Device(c) => {
                push_integer(&mut out, "originDeviceId", c.device_id);
                optional(&mut out, "originDeviceClass", &c.device_class);
                optional(&mut out, "originDeviceIp", &c.device_ip);
            }
            Origin::Home(c) => {
                optional(&mut out, "originProjectKeyId", &c.project_key_id);
                optional(&mut out, "originProjectKeyName", &c.project_key_name);
            }
        }
        out.push(b'}');
        Ok(out)
    }
}

/// The valid JSON string `raw` (with its quotes), decoded; borrowed when it
/// has no escape.
fn decode_string(raw: &str) -> Result<Cow<'_, str>, Error> {
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains('\\') {
        return Ok(Cow::Borrowed(inner));
    }
    serde_json::from_str(raw)
        .map(Cow::Owned)
        .map_err(|e| Error::Other(format!("cannot decode a string the scanner accepted: {e}")))
}

/// The valid JSON value `raw` as a u64, if it is an integer in range (what
/// serde_json's `as_u64` gives: not `-0`, `1.0` or `1e2`).
fn non_negative_integer(raw: &str) -> Option<u64> {
    if raw.bytes().all(|b| b.is_ascii_digit()) {
        raw.parse().ok()
    } else {
        None
    }
}

/// Appends `,"key":value` (`key` needs no escaping).
fn push_integer(out: &mut Vec<u8>, key: &str, value: u64) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The `invalid-event-json` error for a payload the scanner refused, with
/// serde_json's offset and wording (the scanner's own, should serde_json
/// disagree and accept it: the scanner's tests say it does not).
fn syntax_error(payload: &[u8], fault: json::Fault) -> Error {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Err(e) => Error::InvalidEventJson {
            offset: json_error_offset(payload, &e),
            detail: e.to_string(),
        },
        Ok(_) => Error::InvalidEventJson {
            offset: fault.offset as u64,
            detail: fault.reason.to_owned(),
        },
    }
}

/// Byte offset of a JSON syntax error: serde_json reports a 1-based line and
/// a column that counts bytes (1-based, at the offending byte); an error at
/// the end of the input is reported at the payload's length.
fn json_error_offset(payload: &[u8], e: &serde_json::Error) -> u64 {
    if e.is_eof() {
        return payload.len() as u64;
    }
    let line_start = if e.line() <= 1 {
        0
    } else {
        payload
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(e.line() - 2)
            .map_or(payload.len(), |(i, _)| i + 1)
    };
    (line_start + e.column().saturating_sub(1)).min(payload.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(home: Option<u64>) -> DeviceContext {
        DeviceContext {
            device_id: 1001,
            home_id: home,
            device_class: Some("sensor".into()),
            device_ip: Some("192.0.2.7".into()),
            received_at: "2026-01-02T03:04:05Z".into(),
        }
    }

    fn home() -> HomeContext {
        HomeContext {
            home_id: 42,
            project_key_id: Some("k-1".into()),
            project_key_name: Some("ingest".into()),
            received_at: "2026-01-02T03:04:05Z".into(),
        }
    }

    fn mode_event(payload: &str, origin: Origin<'_>) -> Result<String, Error> {
        let bytes = Payload::parse(payload.as_bytes())?.into_mode_event(origin)?;
        Ok(String::from_utf8(bytes).unwrap())
    }

    fn json_offset(payload: &str) -> u64 {
        match Payload::parse(payload.as_bytes()) {
            Err(Error::InvalidEventJson { offset, .. }) => offset,
            other => panic!("expected invalid-event-json, got {other:?}"),
        }
    }

    fn field(r: Result<impl std::fmt::Debug, Error>) -> String {
        match r {
            Err(Error::InvalidField { field, .. }) => field,
            other => panic!("expected invalid-field, got {other:?}"),
        }
    }

    #[test]
    fn device_event_keys_in_order() {
        let out = mode_event(
            r#"{"timestamp":"2025-12-31T23:59:59.5+09:00","eventData":{"z":1,"a":[true,null]},"extra":1,"eventType":"temp"}"#,
            Origin::Device(&device(Some(7))),
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"eventType":"temp","eventData":{"z":1,"a":[true,null]},"timestamp":"2025-12-31T23:59:59.5+09:00","homeId":7,"originDeviceId":1001,"originDeviceClass":"sensor","originDeviceIp":"192.0.2.7"}"#
        );
    }

    #[test]
    fn event_data_is_copied_as_sent_without_whitespace_between_tokens() {
        let out = mode_event(
            "{\"eventData\": { \"a\" : 1e2,\n \"b\": [ 1.0, 18446744073709551616 ],\
             \"a\":\"\\u0041 \\/ x\" } , \"eventType\":\"t\",\"eventData\":{\"c\":1}}",
            Origin::Device(&device(Some(7))),
        )
        .unwrap();
        assert!(
            out.contains(r#""eventData":{"c":1},"#),
            "the last eventData: {out}"
        );
        let out = mode_event(
            "{\"eventType\":\"t\",\"eventData\": { \"a\" : 1e2,\n \"b\": [ 1.0, 18446744073709551616 ],\
             \"a\":\"\\u0041 \\/ x\" }}",
            Origin::Device(&device(Some(7))),
        )
        .unwrap();
        assert!(
            out.contains(
                r#""eventData":{"a":1e2,"b":[1.0,18446744073709551616],"a":"\u0041 \/ x"},"#
            ),
            "{out}"
        );
    }

    #[test]
    fn escaped_top_level_keys_and_event_types_are_decoded() {
        let out = mode_event(
            r#"{"event\u0054ype":"\u0074emp","eventData":{}}"#,
            Origin::Device(&device(Some(7))),
        )
        .unwrap();
        assert!(out.starts_with(r#"{"eventType":"temp","#), "{out}");
    }

    #[test]
    fn device_event_without_class_or_ip() {
        let ctx = DeviceContext {
            device_class: None,
            device_ip: None,
            ..device(Some(7))
        };
        let out = mode_event(r#"{"eventType":"t","eventData":{}}"#, Origin::Device(&ctx)).unwrap();
        assert_eq!(
            out,
            r#"{"eventType":"t","eventData":{},"timestamp":"2026-01-02T03:04:05Z","homeId":7,"originDeviceId":1001}"#
        );
    }

    #[test]
    fn home_event_keys_in_order() {
        let out = mode_event(
            r#"{"eventType":"t","eventData":{"b":"x"},"homeId":999,"timestamp":"bad"}"#,
            Origin::Home(&home()),
        )
        .unwrap();
        assert_eq!(
            out,
            r#"{"eventType":"t","eventData":{"b":"x"},"timestamp":"2026-01-02T03:04:05Z","homeId":42,"originProjectKeyId":"k-1","originProjectKeyName":"ingest"}"#
        );
        let bare = HomeContext {
            project_key_id: None,
            project_key_name: None,
            ..home()
        };
        let out = mode_event(r#"{"eventType":"t","eventData":{}}"#, Origin::Home(&bare)).unwrap();
        assert_eq!(
            out,
            r#"{"eventType":"t","eventData":{},"timestamp":"2026-01-02T03:04:05Z","homeId":42}"#
        );
    }

    #[test]
    fn timestamp_kept_or_replaced() {
        let ctx = device(Some(1));
        for (ts, want) in [
            (r#""2024-02-29T10:00:00z""#, "2024-02-29T10:00:00z"),
            (r#""2026-02-29T10:00:00Z""#, "2026-01-02T03:04:05Z"),
            ("1767322800", "2026-01-02T03:04:05Z"),
            ("null", "2026-01-02T03:04:05Z"),
            (r#""""#, "2026-01-02T03:04:05Z"),
        ] {
            let out = mode_event(
                &format!(r#"{{"eventType":"t","eventData":{{}},"timestamp":{ts}}}"#),
                Origin::Device(&ctx),
            )
            .unwrap();
            assert!(
                out.contains(&format!(r#""timestamp":"{want}""#)),
                "{ts}: {out}"
            );
        }
    }

    #[test]
    fn home_id_from_context_then_payload() {
        let with = r#"{"eventType":"t","eventData":{},"homeId":5}"#;
        assert!(
            mode_event(with, Origin::Device(&device(Some(7))))
                .unwrap()
                .contains(r#""homeId":7"#)
        );
        assert!(
            mode_event(with, Origin::Device(&device(None)))
                .unwrap()
                .contains(r#""homeId":5"#)
        );
        // Context wins even over a malformed payload homeId.
        let bad = r#"{"eventType":"t","eventData":{},"homeId":"5"}"#;
        assert!(mode_event(bad, Origin::Device(&device(Some(7)))).is_ok());
    }

    #[test]
    fn home_id_missing_or_wrong_type() {
        let ctx = device(None);
        match mode_event(r#"{"eventType":"t","eventData":{}}"#, Origin::Device(&ctx)) {
            Err(Error::InvalidField { field, detail }) => {
                assert_eq!(field, "homeId");
                assert_eq!(
                    detail,
                    "device 1001 is not in the device registry and the event carries no homeId"
                );
            }
            other => panic!("{other:?}"),
        }
        for v in [r#""5""#, "-1", "1.5", "null", "{}"] {
            let p = format!(r#"{{"eventType":"t","eventData":{{}},"homeId":{v}}}"#);
            assert_eq!(field(mode_event(&p, Origin::Device(&ctx))), "homeId", "{v}");
        }
    }

    #[test]
    fn event_type_checks() {
        assert_eq!(field(Payload::parse(br#"{"eventData":{}}"#)), "eventType");
        assert_eq!(
            field(Payload::parse(br#"{"eventType":1,"eventData":{}}"#)),
            "eventType"
        );
        assert_eq!(
            field(Payload::parse(br#"{"eventType":"","eventData":{}}"#)),
            "eventType"
        );
        assert_eq!(field(Payload::parse(br#"{"eventType":null}"#)), "eventType");
        let p = Payload::parse("{\"eventType\":\"温度-Ä\"}".as_bytes()).unwrap();
        assert_eq!(p.event_type(), "温度-Ä");
    }

    #[test]
    fn event_data_checks() {
        let ctx = device(Some(1));
        for p in [
            r#"{"eventType":"t"}"#,
            r#"{"eventType":"t","eventData":[]}"#,
            r#"{"eventType":"t","eventData":"x"}"#,
            r#"{"eventType":"t","eventData":null}"#,
        ] {
            assert_eq!(
                field(mode_event(p, Origin::Device(&ctx))),
                "eventData",
                "{p}"
            );
        }
    }

    #[test]
    fn invalid_json_offsets() {
        assert_eq!(json_offset(""), 0);
        assert_eq!(json_offset("   "), 3);
        assert_eq!(json_offset("{"), 1);
        assert_eq!(json_offset("{x"), 1);
        assert_eq!(json_offset(r#"{"a":1,}"#), 7);
        assert_eq!(json_offset("{\n  \"a\": tru }"), 12);
        assert_eq!(json_offset("{\"a\":1}\n\n  x"), 11);
        assert_eq!(json_offset("{\"é\":1 x}"), 8);
    }

    #[test]
    fn invalid_utf8_is_invalid_json() {
        match Payload::parse(b"{\"a\":\"\xff\"}") {
            Err(Error::InvalidEventJson { offset, .. }) => assert!(offset <= 8, "{offset}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_objects_are_invalid_json_at_their_first_byte() {
        assert_eq!(json_offset("[1]"), 0);
        assert_eq!(json_offset("  \"s\""), 2);
        assert_eq!(json_offset("\n42"), 1);
        assert_eq!(json_offset("null"), 0);
    }
}
