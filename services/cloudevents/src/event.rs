//! The CloudEvents 1.0 envelope and its JSON format (structured and batch).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use crate::CloudEventError;

/// The only CloudEvents version this crate reads and writes.
pub const SPEC_VERSION: &str = "1.0";
/// Media type of ccm's own event payloads.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Context attribute names defined by the spec (and the JSON format's data members); an
/// extension may not use them.
pub const RESERVED_ATTRIBUTES: &[&str] = &[
    "id",
    "source",
    "specversion",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
];

/// The payload of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// A JSON value (JSON `datacontenttype`, or none).
    Json(Value),
    /// Text that is not JSON (e.g. `text/plain`, `application/xml`).
    Text(String),
    /// Raw bytes (`data_base64` in the JSON format).
    Binary(Bytes),
}

/// A CloudEvents 1.0 event.
///
/// Extension attributes are kept in their canonical string form (the JSON format's booleans
/// and integers are converted to `"true"`/`"false"` and decimal strings on decode), matching
/// `ccm.v1.CloudEvent.extensions`.
///
/// Construct with [`CloudEvent::new`] and the `with_*` methods; check with
/// [`CloudEvent::validate`]. The JSON format is [`CloudEvent::to_json`] /
/// [`CloudEvent::from_json`]; the [`serde`] impls use the same format.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    /// Identifies the event; unique per `source`.
    pub id: String,
    /// URI-reference of the producer, e.g. `ccm/control-plane`.
    pub source: String,
    /// Always [`SPEC_VERSION`] for valid events.
    pub specversion: String,
    /// Event type, e.g. `ccm.lablet.instance.running`.
    pub event_type: String,
    /// What the event is about, e.g. an instance id.
    pub subject: Option<String>,
    /// When the occurrence happened.
    pub time: Option<DateTime<Utc>>,
    /// Media type of [`CloudEvent::data`].
    pub datacontenttype: Option<String>,
    /// URI of the schema the data adheres to.
    pub dataschema: Option<String>,
    /// The payload.
    pub data: Option<Data>,
    /// Extension attributes, by (lower-case alphanumeric) name.
    pub extensions: BTreeMap<String, String>,
}

impl CloudEvent {
    /// An event with the required attributes and nothing else.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        event_type: impl Into<String>,
    ) -> CloudEvent {
        CloudEvent {
            id: id.into(),
            source: source.into(),
            specversion: SPEC_VERSION.to_owned(),
            event_type: event_type.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> CloudEvent {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the time.
    pub fn with_time(mut self, time: DateTime<Utc>) -> CloudEvent {
        self.time = Some(time);
        self
    }

    /// Sets a JSON payload with `datacontenttype` `application/json`.
    pub fn with_json(mut self, data: Value) -> CloudEvent {
        self.datacontenttype = Some(JSON_CONTENT_TYPE.to_owned());
        self.data = Some(Data::Json(data));
        self
    }

    /// Sets a payload and its media type.
    pub fn with_data(mut self, content_type: impl Into<String>, data: Data) -> CloudEvent {
        self.datacontenttype = Some(content_type.into());
        self.data = Some(data);
        self
    }

    /// Adds an extension attribute.
    pub fn with_extension(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> CloudEvent {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// Checks the event against the spec: required attributes present and non-empty,
    /// `specversion` 1.0, `source` and `dataschema` URI-references without spaces, a media type
    /// in `datacontenttype`, extension names of lower-case ASCII letters and digits that are not
    /// spec attribute names.
    pub fn validate(&self) -> Result<(), CloudEventError> {
        if self.specversion.is_empty() {
            return Err(CloudEventError::MissingAttribute("specversion".to_owned()));
        }
        if self.specversion != SPEC_VERSION {
            return Err(CloudEventError::UnsupportedSpecVersion(
                self.specversion.clone(),
            ));
        }
        for (name, value) in [
            ("id", &self.id),
            ("source", &self.source),
            ("type", &self.event_type),
        ] {
            if value.is_empty() {
                return Err(CloudEventError::MissingAttribute(name.to_owned()));
            }
        }
        check_uri_reference("source", &self.source)?;
        if let Some(subject) = &self.subject
            && subject.is_empty()
        {
            return Err(CloudEventError::invalid(
                "subject",
                "must not be empty when present",
            ));
        }
        if let Some(content_type) = &self.datacontenttype {
            check_media_type(content_type)?;
        }
        if let Some(schema) = &self.dataschema {
            if schema.is_empty() {
                return Err(CloudEventError::invalid(
                    "dataschema",
                    "must not be empty when present",
                ));
            }
            check_uri_reference("dataschema", schema)?;
        }
        for name in self.extensions.keys() {
            check_extension_name(name)?;
        }
        Ok(())
    }

    /// The event in the JSON format (structured mode body), without validating it.
    pub fn to_json_value(&self) -> Value {
        let mut map = Map::new();
        map.insert(
            "specversion".into(),
            Value::String(self.specversion.clone()),
        );
        map.insert("id".into(), Value::String(self.id.clone()));
        map.insert("source".into(), Value::String(self.source.clone()));
        map.insert("type".into(), Value::String(self.event_type.clone()));
        if let Some(subject) = &self.subject {
            map.insert("subject".into(), Value::String(subject.clone()));
        }
        if let Some(time) = &self.time {
            map.insert("time".into(), Value::String(format_time(time)));
        }
        if let Some(content_type) = &self.datacontenttype {
            map.insert(
                "datacontenttype".into(),
                Value::String(content_type.clone()),
            );
        }
        if let Some(schema) = &self.dataschema {
            map.insert("dataschema".into(), Value::String(schema.clone()));
        }
        for (name, value) in &self.extensions {
            map.insert(name.clone(), Value::String(value.clone()));
        }
        match &self.data {
            Some(Data::Json(value)) => {
                map.insert("data".into(), value.clone());
            }
            Some(Data::Text(text)) => {
                map.insert("data".into(), Value::String(text.clone()));
            }
            Some(Data::Binary(bytes)) => {
                map.insert("data_base64".into(), Value::String(BASE64.encode(bytes)));
            }
            None => {}
        }
        Value::Object(map)
    }

    /// The event as a JSON document (`application/cloudevents+json`), after validating it.
    pub fn to_json(&self) -> Result<Vec<u8>, CloudEventError> {
        self.validate()?;
        serde_json::to_vec(&self.to_json_value())
            .map_err(|e| CloudEventError::Malformed(e.to_string()))
    }

    /// Reads and validates an event from a JSON-format value.
    ///
    /// `data` becomes [`Data::Json`] when `datacontenttype` is absent or a JSON media type,
    /// [`Data::Text`] when it is another media type and `data` is a string; `data_base64`
    /// becomes [`Data::Binary`]; both at once are refused. Attributes with a JSON `null` value
    /// are treated as absent.
    pub fn from_json_value(value: Value) -> Result<CloudEvent, CloudEventError> {
        let Value::Object(mut map) = value else {
            return Err(CloudEventError::Malformed(
                "a CloudEvent in JSON must be an object".to_owned(),
            ));
        };
        let specversion = take_string(&mut map, "specversion")?
            .ok_or_else(|| CloudEventError::MissingAttribute("specversion".to_owned()))?;
        if specversion != SPEC_VERSION {
            return Err(CloudEventError::UnsupportedSpecVersion(specversion));
        }
        let required = |map: &mut Map<String, Value>, name: &str| {
            take_string(map, name)?
                .ok_or_else(|| CloudEventError::MissingAttribute(name.to_owned()))
        };
        let id = required(&mut map, "id")?;
        let source = required(&mut map, "source")?;
        let event_type = required(&mut map, "type")?;
        let subject = take_string(&mut map, "subject")?;
        let time = take_string(&mut map, "time")?
            .map(|t| parse_time(&t))
            .transpose()?;
        let datacontenttype = take_string(&mut map, "datacontenttype")?;
        let dataschema = take_string(&mut map, "dataschema")?;
        let data = map.remove("data").filter(|v| !v.is_null());
        let data_base64 = take_string(&mut map, "data_base64")?;
        let data = match (data, data_base64) {
            (Some(_), Some(_)) => {
                return Err(CloudEventError::Malformed(
                    "both data and data_base64 are present".to_owned(),
                ));
            }
            (None, Some(b64)) => Some(Data::Binary(Bytes::from(
                BASE64
                    .decode(b64.as_bytes())
                    .map_err(|e| CloudEventError::Malformed(format!("data_base64: {e}")))?,
            ))),
            (Some(Value::String(text)), None)
                if datacontenttype
                    .as_deref()
                    .is_some_and(|ct| !is_json_media_type(ct)) =>
            {
                Some(Data::Text(text))
            }
            (Some(value), None) => Some(Data::Json(value)),
            (None, None) => None,
        };
        let mut extensions = BTreeMap::new();
        for (name, value) in map {
            let value = match value {
                Value::Null => continue,
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                other => {
                    return Err(CloudEventError::invalid(
                        name,
                        format!(
                            "extension values must be strings, booleans or integers, not {other}"
                        ),
                    ));
                }
            };
            extensions.insert(name, value);
        }
        let event = CloudEvent {
            id,
            source,
            specversion,
            event_type,
            subject,
            time,
            datacontenttype,
            dataschema,
            data,
            extensions,
        };
        event.validate()?;
        Ok(event)
    }

    /// Reads and validates an event from a JSON document (`application/cloudevents+json`).
    pub fn from_json(bytes: &[u8]) -> Result<CloudEvent, CloudEventError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| CloudEventError::Malformed(e.to_string()))?;
        CloudEvent::from_json_value(value)
    }
}

impl serde::Serialize for CloudEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for CloudEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        CloudEvent::from_json_value(value).map_err(serde::de::Error::custom)
    }
}

/// Encodes events as a JSON batch (`application/cloudevents-batch+json`), validating each.
pub fn to_json_batch(events: &[CloudEvent]) -> Result<Vec<u8>, CloudEventError> {
    let mut values = Vec::with_capacity(events.len());
    for event in events {
        event.validate()?;
        values.push(event.to_json_value());
    }
    serde_json::to_vec(&Value::Array(values)).map_err(|e| CloudEventError::Malformed(e.to_string()))
}

/// Reads a JSON batch (`application/cloudevents-batch+json`): an array of JSON-format events.
/// One invalid event fails the whole batch, naming its index.
pub fn from_json_batch(bytes: &[u8]) -> Result<Vec<CloudEvent>, CloudEventError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| CloudEventError::Malformed(e.to_string()))?;
    let Value::Array(items) = value else {
        return Err(CloudEventError::Malformed(
            "a CloudEvents batch must be a JSON array".to_owned(),
        ));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            CloudEvent::from_json_value(item).map_err(|e| match e {
                CloudEventError::Malformed(m) => {
                    CloudEventError::Malformed(format!("batch item {i}: {m}"))
                }
                other => other,
            })
        })
        .collect()
}

/// `true` for `application/json`, `text/json` and any `+json` suffix type, ignoring
/// parameters and case.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// RFC 3339 with the precision the time has, `Z` for UTC.
pub(crate) fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>, CloudEventError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| CloudEventError::invalid("time", format!("{text:?} is not RFC 3339: {e}")))
}

fn take_string(
    map: &mut Map<String, Value>,
    name: &str,
) -> Result<Option<String>, CloudEventError> {
    match map.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CloudEventError::invalid(
            name,
            format!("must be a string, got {other}"),
        )),
    }
}

fn check_uri_reference(name: &str, value: &str) -> Result<(), CloudEventError> {
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CloudEventError::invalid(
            name,
            "a URI-reference contains no whitespace or control characters",
        ));
    }
    Ok(())
}

fn check_media_type(value: &str) -> Result<(), CloudEventError> {
    let essence = value.split(';').next().unwrap_or("").trim();
    let valid = essence.split_once('/').is_some_and(|(top, sub)| {
        let token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$&-^_.+".contains(c))
        };
        token(top) && token(sub)
    });
    if valid {
        Ok(())
    } else {
        Err(CloudEventError::invalid(
            "datacontenttype",
            format!("{value:?} is not a media type (type/subtype)"),
        ))
    }
}

/// Extension names: lower-case ASCII letters and digits, not a spec attribute.
pub(crate) fn check_extension_name(name: &str) -> Result<(), CloudEventError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return Err(CloudEventError::invalid(
            name,
            "extension names consist of lower-case ASCII letters and digits",
        ));
    }
    if RESERVED_ATTRIBUTES.contains(&name) {
        return Err(CloudEventError::invalid(
            name,
            "is a CloudEvents attribute, not an extension",
        ));
    }
    Ok(())
}
