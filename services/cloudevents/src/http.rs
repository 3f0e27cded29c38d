//! The CloudEvents HTTP protocol binding: structured, batched and binary content modes.
//!
//! - Structured: `Content-Type: application/cloudevents+json`, the body is one JSON-format
//!   event.
//! - Batched: `Content-Type: application/cloudevents-batch+json`, the body is a JSON array of
//!   events.
//! - Binary: the context attributes travel as `ce-<name>` headers (values percent-encoded),
//!   `datacontenttype` as `Content-Type`, the payload as the body.
//!
//! [`decode_request`] reads any of the three (the ingest endpoint's entry point);
//! [`encode_structured`] and [`encode_binary`] write.

use bytes::Bytes;
use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use serde_json::Value;

use crate::event::{check_extension_name, format_time, is_json_media_type, parse_time};
use crate::{CloudEvent, CloudEventError, Data, SPEC_VERSION};

/// Media type of a structured-mode event in the JSON format.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Media type of a batch of events in the JSON format.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Prefix of binary-mode attribute headers.
pub const HEADER_PREFIX: &str = "ce-";

/// How an HTTP message carries events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One event in the body, `application/cloudevents+json`.
    Structured,
    /// A JSON array of events, `application/cloudevents-batch+json`.
    Batch,
    /// Attributes in `ce-*` headers, payload in the body.
    Binary,
}

/// Tells the content mode from the headers: the `Content-Type` for structured and batched
/// mode, a `ce-specversion` header for binary mode; `None` when it is no CloudEvent.
pub fn detect_mode(headers: &HeaderMap) -> Option<Mode> {
    let essence = content_type_essence(headers);
    if essence.as_deref() == Some(BATCH_CONTENT_TYPE) {
        Some(Mode::Batch)
    } else if essence.as_deref() == Some(STRUCTURED_CONTENT_TYPE) {
        Some(Mode::Structured)
    } else if headers.contains_key("ce-specversion") {
        Some(Mode::Binary)
    } else {
        None
    }
}

/// Reads the events of an HTTP request in any content mode (one event for structured and
/// binary mode, any number for batch mode). Every event is validated.
pub fn decode_request(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<CloudEvent>, CloudEventError> {
    match detect_mode(headers) {
        Some(Mode::Structured) => Ok(vec![CloudEvent::from_json(body)?]),
        Some(Mode::Batch) => crate::event::from_json_batch(body),
        Some(Mode::Binary) => Ok(vec![decode_binary(headers, body)?]),
        None => {
            let content_type = content_type_essence(headers);
            Err(CloudEventError::NotACloudEvent(match content_type {
                Some(ct) if ct.starts_with("application/cloudevents") => {
                    format!("event format {ct:?} is not supported (only JSON)")
                }
                Some(ct) => format!("Content-Type {ct:?} without ce-specversion header"),
                None => "no Content-Type and no ce-specversion header".to_owned(),
            }))
        }
    }
}

/// Reads a binary-mode event: `ce-*` headers (percent-decoded) become attributes and
/// extensions, `Content-Type` becomes `datacontenttype`, and the body becomes the data —
/// [`Data::Json`] for a JSON media type (it must parse), [`Data::Text`] for `text/*` (it must
/// be UTF-8), [`Data::Binary`] otherwise; an empty body is no data.
pub fn decode_binary(headers: &HeaderMap, body: &[u8]) -> Result<CloudEvent, CloudEventError> {
    let mut event = CloudEvent::new("", "", "");
    event.specversion = String::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let raw = value
            .to_str()
            .map_err(|_| CloudEventError::invalid(attribute, "header value is not ASCII"))?;
        let value = percent_decode(raw)
            .ok_or_else(|| CloudEventError::invalid(attribute, "bad percent-encoding"))?;
        match attribute {
            "specversion" => event.specversion = value,
            "id" => event.id = value,
            "source" => event.source = value,
            "type" => event.event_type = value,
            "subject" => event.subject = Some(value),
            "time" => event.time = Some(parse_time(&value)?),
            "dataschema" => event.dataschema = Some(value),
            "datacontenttype" => {
                return Err(CloudEventError::invalid(
                    "datacontenttype",
                    "in binary mode the media type is the Content-Type header, not ce-datacontenttype",
                ));
            }
            other => {
                check_extension_name(other)?;
                // The first of repeated headers wins.
                event.extensions.entry(other.to_owned()).or_insert(value);
            }
        }
    }
    if event.specversion.is_empty() {
        return Err(CloudEventError::MissingAttribute("specversion".to_owned()));
    }
    if event.specversion != SPEC_VERSION {
        return Err(CloudEventError::UnsupportedSpecVersion(event.specversion));
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                CloudEventError::invalid("datacontenttype", "Content-Type is not ASCII")
            })
        })
        .transpose()?;
    event.data = if body.is_empty() {
        None
    } else {
        match content_type.as_deref() {
            Some(ct) if is_json_media_type(ct) => Some(Data::Json(
                serde_json::from_slice::<Value>(body)
                    .map_err(|e| CloudEventError::Malformed(format!("JSON body: {e}")))?,
            )),
            Some(ct) if ct.trim_start().to_ascii_lowercase().starts_with("text/") => {
                Some(Data::Text(String::from_utf8(body.to_vec()).map_err(
                    |_| CloudEventError::Malformed("text body is not UTF-8".to_owned()),
                )?))
            }
            _ => Some(Data::Binary(Bytes::copy_from_slice(body))),
        }
    };
    event.datacontenttype = content_type;
    event.validate()?;
    Ok(event)
}

/// The headers and body of a structured-mode request for `event` (validated).
pub fn encode_structured(event: &CloudEvent) -> Result<(HeaderMap, Bytes), CloudEventError> {
    let body = event.to_json()?;
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
    );
    Ok((headers, Bytes::from(body)))
}

/// The headers and body of a binary-mode request for `event` (validated). Header values are
/// percent-encoded as the HTTP binding asks (space, `"`, `%` and everything outside printable
/// ASCII). A JSON payload without `datacontenttype` is sent as `application/json`.
pub fn encode_binary(event: &CloudEvent) -> Result<(HeaderMap, Bytes), CloudEventError> {
    event.validate()?;
    let mut headers = HeaderMap::new();
    let mut put = |name: &str, value: &str| -> Result<(), CloudEventError> {
        let header = HeaderName::from_bytes(format!("{HEADER_PREFIX}{name}").as_bytes())
            .map_err(|e| CloudEventError::invalid(name, e.to_string()))?;
        let value = HeaderValue::from_str(&percent_encode(value))
            .map_err(|e| CloudEventError::invalid(name, e.to_string()))?;
        headers.insert(header, value);
        Ok(())
    };
    put("specversion", &event.specversion)?;
    put("id", &event.id)?;
    put("source", &event.source)?;
    put("type", &event.event_type)?;
    if let Some(subject) = &event.subject {
        put("subject", subject)?;
    }
    if let Some(time) = &event.time {
        put("time", &format_time(time))?;
    }
    if let Some(schema) = &event.dataschema {
        put("dataschema", schema)?;
    }
    for (name, value) in &event.extensions {
        put(name, value)?;
    }
    let content_type = event.datacontenttype.clone().or_else(|| match &event.data {
        Some(Data::Json(_)) => Some(crate::JSON_CONTENT_TYPE.to_owned()),
        _ => None,
    });
    if let Some(ct) = content_type {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(&ct)
                .map_err(|e| CloudEventError::invalid("datacontenttype", e.to_string()))?,
        );
    }
    let body = match &event.data {
        None => Bytes::new(),
        Some(Data::Json(value)) => Bytes::from(
            serde_json::to_vec(value).map_err(|e| CloudEventError::Malformed(e.to_string()))?,
        ),
        Some(Data::Text(text)) => Bytes::from(text.clone()),
        Some(Data::Binary(bytes)) => bytes.clone(),
    };
    Ok((headers, body))
}

fn content_type_essence(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trip() {
        for s in ["plain", "with space", "quote\"and%", "ünïcødé €", ""] {
            let encoded = percent_encode(s);
            assert!(
                encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{encoded}"
            );
            assert_eq!(percent_decode(&encoded).as_deref(), Some(s));
        }
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
