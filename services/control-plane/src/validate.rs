//! Input validation: a [`Violations`] collector and the reusable checks every handler uses.
//!
//! A handler validates a whole request before it touches state, collecting **every** problem,
//! then fails once with all of them (`INVALID_ARGUMENT` with one `BadRequest` field violation
//! each):
//!
//! ```
//! use ccm_control_plane::validate::{self, Violations};
//!
//! let mut v = Violations::new();
//! let name = validate::resource_name(&mut v, "template.name", "Bad Name!");
//! let _region = validate::non_empty(&mut v, "region", "");
//! let err = v.into_result().unwrap_err();
//! assert_eq!(err.field_violations().len(), 2);
//! assert!(name.is_none());
//! ```
//!
//! Every check takes the collector, the field path (as the client sent it:
//! `definition.port_template.ports[2].name`; build paths with [`join_path`], [`index_path`] and
//! [`key_path`]) and the value, records a violation when the value is bad, and returns the
//! parsed value (`Some`) when it is good, so the caller can keep going and collect more.
//!
//! # Decisions
//!
//! * **Resource names** ([`resource_name`]): 1..=[`MAX_NAME_LEN`] characters of
//!   `[a-z0-9]([a-z0-9._-]*[a-z0-9])?` — lower-case ASCII letters and digits, with `-`, `_`, `.`
//!   inside. They are identities (keys, EC2 tags, URL segments), so anything else is refused,
//!   including every HTML/script payload (domain.md §9: "XSS payloads and oversized names are
//!   rejected"). Template names are stricter ([`template_name`]: `[a-z0-9-]`, ≤ 63, as
//!   template.proto says). Use it for `LabletDefinition.name`, `WorkerTemplate.name`,
//!   `CmlWorker.name` / `CreateWorkerRequest.name`; [`slugify_name`] turns an EC2 Name tag into
//!   one on import.
//! * **Free text** ([`free_text`]): descriptions, reasons, messages. Length-limited; control
//!   characters (other than newline and tab in multi-line text) and Unicode bidirectional
//!   overrides are refused; anything else, including `<script>`, is accepted and stored inert —
//!   it is data, escaped by whoever renders it.
//! * **Ids** ([`id`]): a UUID or a resource name.
//! * **URIs** ([`uri`]): `s3://bucket/key`, `file:///absolute/path` (no `..`), `https://host/…`;
//!   `http://` only when the policy allows it; no credentials (`user@`), no whitespace.
//! * **Enums** ([`enum_value`]): a number the contract does not define is refused, and so is
//!   `*_UNSPECIFIED` where the field is required.
//! * **Time slots** ([`time_slot`]): ASAP starts now; otherwise start ≥ now − [`MAX_CLOCK_SKEW`]
//!   and ≤ now + [`MAX_BOOKING_HORIZON`]; end defaults to start + max duration; end > start and
//!   end − start ≤ max duration.
//! * **Page sizes**: see [`crate::paging::page_size`] (0 → default, above the maximum → clamped,
//!   negative → refused).
//! * **Labels / EC2 tags** ([`labels`], [`ec2_tags`]): at most [`MAX_LABELS`] entries, keys
//!   1..=[`MAX_LABEL_KEY_LEN`], values ≤ [`MAX_LABEL_VALUE_LEN`], no control characters; EC2
//!   tags also refuse the `aws:` prefix and ccm's own `ccm:` keys.
//! * **Lab YAML** ([`lab_yaml`]): ≤ [`MAX_LAB_YAML_BYTES`], parsed with `ccm_core::labyaml`; every
//!   unknown placeholder and every unreferenced port is a violation with its location.

use std::collections::HashSet;

use ccm_core::CoreError;
use ccm_core::labyaml::{self, LabSummary};
use ccm_core::model::{ResourceRequirements, TimeSlot};
use ccm_core::version::Version;
use chrono::{DateTime, Duration, Utc};

use crate::convert;
use crate::error::{ApiError, FieldViolation};

pub use ccm_core::defaults::MAX_NAME_LEN;

/// Longest template name (template.proto: 1..63 characters).
pub const MAX_TEMPLATE_NAME_LEN: usize = 63;
/// Longest port name in a port template.
pub const MAX_PORT_NAME_LEN: usize = 63;
/// Longest description (definition.proto: at most 4096 characters).
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Longest single-line free text: reasons, messages.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest id (UUIDs are 36; ids that are names follow [`MAX_NAME_LEN`]).
pub const MAX_ID_LEN: usize = MAX_NAME_LEN;
/// Longest client idempotency key (`request_id` fields: ≤ 64 characters).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;
/// Longest URI.
pub const MAX_URI_LEN: usize = 2048;
/// Largest lab YAML accepted (definition.proto: at most 4 MiB).
pub const MAX_LAB_YAML_BYTES: usize = 4 * 1024 * 1024;
/// Most entries of a label / tag map (EC2 allows 50 tags per resource).
pub const MAX_LABELS: usize = 50;
/// Longest label / tag key (EC2: 128).
pub const MAX_LABEL_KEY_LEN: usize = 128;
/// Longest label / tag value (EC2: 256).
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// How far in the past a non-ASAP slot start may be (client clocks drift).
pub const MAX_CLOCK_SKEW: Duration = Duration::seconds(60);
/// How far ahead a slot may be booked.
pub const MAX_BOOKING_HORIZON: Duration = Duration::days(366);
/// Sanity bound on CPU cores a definition may require.
pub const MAX_CPU_CORES: i64 = 1024;
/// Sanity bound on memory (GiB) a definition may require.
pub const MAX_MEMORY_GB: i64 = 32 * 1024;
/// Sanity bound on storage (GiB) a definition may require.
pub const MAX_STORAGE_GB: i64 = 64 * 1024;
/// Sanity bound on the node count of a definition.
pub const MAX_NODE_COUNT: i64 = 10_000;
/// EC2 tag key prefix reserved by AWS.
pub const RESERVED_TAG_PREFIX_AWS: &str = "aws:";
/// EC2 tag key prefix of the tags ccm manages itself (`ccm:template`, `ccm:managed`).
pub const RESERVED_TAG_PREFIX_CCM: &str = "ccm:";

// ---------------------------------------------------------------------------------------------
// Field paths
// ---------------------------------------------------------------------------------------------

/// `prefix.field`; just `field` when the prefix is empty, `prefix[..]` when `field` starts with
/// an index.
pub fn join_path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else if field.is_empty() {
        prefix.to_owned()
    } else if field.starts_with('[') {
        format!("{prefix}{field}")
    } else {
        format!("{prefix}.{field}")
    }
}

/// `prefix[i]`, the path of a repeated field's element.
pub fn index_path(prefix: &str, i: usize) -> String {
    format!("{prefix}[{i}]")
}

/// `prefix["key"]`, the path of a map entry (the key quoted and escaped, so a hostile key cannot
/// forge a path).
pub fn key_path(prefix: &str, key: &str) -> String {
    format!("{prefix}[{key:?}]")
}

// ---------------------------------------------------------------------------------------------
// The collector
// ---------------------------------------------------------------------------------------------

/// Collects field violations; [`Violations::into_result`] turns them into one
/// `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    items: Vec<FieldViolation>,
}

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Violations::default()
    }

    /// Records that `field` is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.items.push(FieldViolation::new(field, description));
    }

    /// Records a violation of `field` unless `ok`; returns `ok`.
    pub fn check(
        &mut self,
        ok: bool,
        field: impl Into<String>,
        description: impl Into<String>,
    ) -> bool {
        if !ok {
            self.add(field, description);
        }
        ok
    }

    /// Takes over the result of a nested conversion or check: `Ok` → `Some(value)`; an
    /// `INVALID_ARGUMENT` → its violations are recorded and `None` is returned. Any other error
    /// is recorded as a violation of `""` with its message (a conversion should not produce
    /// them).
    pub fn absorb<T>(&mut self, result: Result<T, ApiError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(ApiError::InvalidArgument { violations }) => {
                self.items.extend(violations);
                None
            }
            Err(other) => {
                self.add("", other.to_string());
                None
            }
        }
    }

    /// Records a [`CoreError`] as violations (an `Invalid{field}` keeps its field, prefixed with
    /// `prefix`).
    pub fn absorb_core<T>(&mut self, prefix: &str, result: Result<T, CoreError>) -> Option<T> {
        self.absorb(result.map_err(|e| ApiError::from(e).under(prefix)))
    }

    /// Appends every violation of `other`.
    pub fn extend(&mut self, other: Violations) {
        self.items.extend(other.items);
    }

    /// `true` when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of violations recorded.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The violations recorded so far, in order.
    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.items.iter()
    }

    /// `Ok(())` when nothing was recorded, else `INVALID_ARGUMENT` with every violation.
    pub fn into_result(self) -> Result<(), ApiError> {
        if self.items.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_arguments(self.items))
        }
    }

    /// `Ok(value)` when nothing was recorded, else the `INVALID_ARGUMENT`. The usual end of a
    /// conversion: `v.finish(value)`.
    pub fn finish<T>(self, value: T) -> Result<T, ApiError> {
        self.into_result().map(|()| value)
    }

    /// Like [`Violations::finish`] for a value built from checks that returned `Option`s: `None`
    /// without a recorded violation is a bug and becomes `INTERNAL`.
    pub fn finish_some<T>(self, value: Option<T>) -> Result<T, ApiError> {
        self.into_result()?;
        value.ok_or_else(|| ApiError::internal_msg("validation produced no value and no violation"))
    }
}

// ---------------------------------------------------------------------------------------------
// Strings
// ---------------------------------------------------------------------------------------------

fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Unicode bidirectional formatting characters ("Trojan Source"): refused in free text.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
}

fn is_name_edge(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Why `s` is not a resource name of at most `max` characters over `[a-z0-9]` edges and
/// `inner` characters, or `None` when it is one.
fn name_problem(s: &str, max: usize, inner: fn(char) -> bool, charset: &str) -> Option<String> {
    if s.is_empty() {
        return Some("must not be empty".into());
    }
    let len = char_len(s);
    if len > max {
        return Some(format!("must be at most {max} characters, got {len}"));
    }
    if let Some(bad) = s.chars().find(|c| !inner(*c)) {
        return Some(format!(
            "must contain only {charset}; {bad:?} is not allowed"
        ));
    }
    let (first, last) = (s.chars().next(), s.chars().last());
    if !first.is_some_and(is_name_edge) || !last.is_some_and(is_name_edge) {
        return Some("must start and end with a lower-case letter or digit".into());
    }
    None
}

/// Why `s` is not a resource name, or `None` when it is one (see the module docs).
pub fn resource_name_problem(s: &str) -> Option<String> {
    name_problem(
        s,
        MAX_NAME_LEN,
        is_name_char,
        "lower-case letters, digits, '-', '_' and '.'",
    )
}

/// A resource name: 1..=[`MAX_NAME_LEN`] characters of `[a-z0-9]([a-z0-9._-]*[a-z0-9])?`.
pub fn resource_name<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    match resource_name_problem(value) {
        None => Some(value),
        Some(why) => {
            v.add(field, why);
            None
        }
    }
}

/// A worker template name: 1..=[`MAX_TEMPLATE_NAME_LEN`] characters of
/// `[a-z0-9]([a-z0-9-]*[a-z0-9])?`.
pub fn template_name<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    let inner = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    match name_problem(
        value,
        MAX_TEMPLATE_NAME_LEN,
        inner,
        "lower-case letters, digits and '-'",
    ) {
        None => Some(value),
        Some(why) => {
            v.add(field, why);
            None
        }
    }
}

/// A port name of a port template: lower snake case `[a-z][a-z0-9_]*`, at most
/// [`MAX_PORT_NAME_LEN`] characters (it becomes the `${PORT_<NAME>}` placeholder).
pub fn port_name<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    let problem = if value.is_empty() {
        Some("must not be empty".to_owned())
    } else if char_len(value) > MAX_PORT_NAME_LEN {
        Some(format!("must be at most {MAX_PORT_NAME_LEN} characters"))
    } else if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lower-case letter".to_owned())
    } else {
        value
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
            .map(|bad| {
                format!("must be lower snake case (letters, digits, '_'); {bad:?} is not allowed")
            })
    };
    match problem {
        None => Some(value),
        Some(why) => {
            v.add(field, why);
            None
        }
    }
}

/// Turns arbitrary text (an EC2 Name tag, a lab title) into a resource name: lower-cased,
/// runs of other characters replaced by `-`, trimmed, cut to [`MAX_NAME_LEN`]. `None` if nothing
/// usable is left.
pub fn slugify_name(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut pending_dash = false;
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if pending_dash && !out.is_empty() {
                out.push('-');
            }
            pending_dash = false;
            out.push(c);
        } else {
            pending_dash = true;
        }
        if out.len() >= MAX_NAME_LEN {
            break;
        }
    }
    out.truncate(MAX_NAME_LEN);
    let trimmed = out.trim_end_matches('-').to_owned();
    (!trimmed.is_empty()).then_some(trimmed)
}

/// A required string: not empty (and not only whitespace).
pub fn non_empty<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    if value.trim().is_empty() {
        v.add(field, "is required");
        None
    } else {
        Some(value)
    }
}

/// Why `value` is not acceptable free text, or `None`.
pub fn free_text_problem(value: &str, max_len: usize, multiline: bool) -> Option<String> {
    let len = char_len(value);
    if len > max_len {
        return Some(format!("must be at most {max_len} characters, got {len}"));
    }
    let bad = value.chars().find(|&c| {
        let allowed_ws = multiline && matches!(c, '\n' | '\t' | '\r');
        (c.is_control() && !allowed_ws) || is_bidi_control(c)
    });
    bad.map(|c| {
        format!(
            "must not contain control or bidirectional formatting characters (found U+{:04X})",
            u32::from(c)
        )
    })
}

/// Free text (description, reason, message): at most `max_len` characters, no control
/// characters except newline and tab when `multiline`, no bidirectional overrides. Markup is
/// accepted and stored as inert data.
pub fn free_text<'a>(
    v: &mut Violations,
    field: &str,
    value: &'a str,
    max_len: usize,
    multiline: bool,
) -> Option<&'a str> {
    match free_text_problem(value, max_len, multiline) {
        None => Some(value),
        Some(why) => {
            v.add(field, why);
            None
        }
    }
}

/// A description: multi-line free text of at most [`MAX_DESCRIPTION_LEN`] characters.
pub fn description<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    free_text(v, field, value, MAX_DESCRIPTION_LEN, true)
}

/// A reason: single-line free text of at most [`MAX_REASON_LEN`] characters.
pub fn reason<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    free_text(v, field, value, MAX_REASON_LEN, false)
}

/// An idempotency key (`request_id` fields): empty (none) or 1..=[`MAX_IDEMPOTENCY_KEY_LEN`]
/// printable ASCII characters without spaces.
pub fn idempotency_key<'a>(
    v: &mut Violations,
    field: &str,
    value: &'a str,
) -> Option<Option<&'a str>> {
    if value.is_empty() {
        return Some(None);
    }
    if value.len() > MAX_IDEMPOTENCY_KEY_LEN {
        v.add(
            field,
            format!("must be at most {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        );
        return None;
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        v.add(field, "must be printable ASCII without spaces");
        return None;
    }
    Some(Some(value))
}

// ---------------------------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------------------------

/// Whether `value` is a UUID in its hyphenated form (any case).
pub fn is_uuid(value: &str) -> bool {
    value.len() == 36 && uuid::Uuid::try_parse(value).is_ok()
}

/// A required UUID (hyphenated form).
pub fn uuid<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    if value.is_empty() {
        v.add(field, "is required");
        None
    } else if is_uuid(value) {
        Some(value)
    } else {
        v.add(
            field,
            "must be a UUID (e.g. 3f2b8c1e-5d7a-4e1b-9c0d-2a6f4b8e1c3d)",
        );
        None
    }
}

/// A required id: a UUID or a resource name (names are ids for templates).
pub fn id<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<&'a str> {
    if value.is_empty() {
        v.add(field, "is required");
        return None;
    }
    if is_uuid(value) || resource_name_problem(value).is_none() {
        Some(value)
    } else {
        v.add(
            field,
            "must be a UUID or a name of lower-case letters, digits, '-', '_' and '.'",
        );
        None
    }
}

/// An optional id: empty → `Some(None)`; otherwise as [`id`].
pub fn optional_id<'a>(v: &mut Violations, field: &str, value: &'a str) -> Option<Option<&'a str>> {
    if value.is_empty() {
        Some(None)
    } else {
        id(v, field, value).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------------------------

/// A required strict semver `MAJOR.MINOR.PATCH` (see `ccm_core::version`).
pub fn semver(v: &mut Violations, field: &str, value: &str) -> Option<Version> {
    if value.is_empty() {
        v.add(field, "is required (MAJOR.MINOR.PATCH, e.g. 1.0.0)");
        return None;
    }
    match value.parse::<Version>() {
        Ok(version) => Some(version),
        Err(CoreError::InvalidVersion { why, .. }) => {
            v.add(field, format!("invalid version {value:?}: {why}"));
            None
        }
        Err(other) => {
            v.add(field, other.to_string());
            None
        }
    }
}

/// An optional semver: empty → `Some(None)`.
pub fn optional_semver(v: &mut Violations, field: &str, value: &str) -> Option<Option<Version>> {
    if value.is_empty() {
        Some(None)
    } else {
        semver(v, field, value).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// URIs
// ---------------------------------------------------------------------------------------------

/// A URI scheme ccm reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UriScheme {
    /// `s3://bucket/key`.
    S3,
    /// `file:///absolute/path`.
    File,
    /// `https://host[:port]/path`.
    Https,
    /// `http://host[:port]/path` (only where the policy allows it).
    Http,
}

impl UriScheme {
    /// The scheme as written, lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            UriScheme::S3 => "s3",
            UriScheme::File => "file",
            UriScheme::Https => "https",
            UriScheme::Http => "http",
        }
    }
}

/// Which schemes a URI field accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UriPolicy {
    /// The accepted schemes.
    pub schemes: &'static [UriScheme],
}

impl UriPolicy {
    /// Lab artifacts and grading rules: `s3`, `file`, `https`.
    pub const ARTIFACT: UriPolicy = UriPolicy {
        schemes: &[UriScheme::S3, UriScheme::File, UriScheme::Https],
    };
    /// As [`UriPolicy::ARTIFACT`] plus plain `http` (development only; configuration decides).
    pub const ARTIFACT_ALLOW_HTTP: UriPolicy = UriPolicy {
        schemes: &[
            UriScheme::S3,
            UriScheme::File,
            UriScheme::Https,
            UriScheme::Http,
        ],
    };
    /// Webhooks and other outbound calls: `https` only.
    pub const HTTPS_ONLY: UriPolicy = UriPolicy {
        schemes: &[UriScheme::Https],
    };
    /// `https` or `http` (e.g. a loopback OIDC issuer in tests).
    pub const HTTP_OR_HTTPS: UriPolicy = UriPolicy {
        schemes: &[UriScheme::Https, UriScheme::Http],
    };

    fn allows(&self, scheme: UriScheme) -> bool {
        self.schemes.contains(&scheme)
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .schemes
            .iter()
            .map(|s| format!("{}://", s.as_str()))
            .collect();
        names.join(", ")
    }
}

fn is_s3_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn authority_problem(authority: &str) -> Option<String> {
    if authority.is_empty() {
        return Some("has no host".into());
    }
    if authority.contains('@') {
        return Some("must not contain credentials (user@host)".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip6, after)) => {
                if ip6.parse::<std::net::Ipv6Addr>().is_err() {
                    return Some(format!("[{ip6}] is not an IPv6 address"));
                }
                match after {
                    "" => (ip6, None),
                    p if p.starts_with(':') => (ip6, Some(&p[1..])),
                    _ => return Some("has characters after the IPv6 address".into()),
                }
            }
            None => return Some("has an unterminated IPv6 address".into()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Some("has no host".into());
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
    {
        return Some(format!("host {host:?} has invalid characters"));
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Some(format!("port {port:?} is not a number in 1..65535")),
        }
    }
    None
}

/// Why `value` is not a URI `policy` accepts, or the scheme when it is one.
pub fn uri_check(value: &str, policy: UriPolicy) -> Result<UriScheme, String> {
    if value.is_empty() {
        return Err("is required".into());
    }
    if value.len() > MAX_URI_LEN {
        return Err(format!("must be at most {MAX_URI_LEN} characters"));
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "must be ASCII without spaces or control characters (percent-encode them); found {bad:?}"
        ));
    }
    let Some((scheme_text, rest)) = value.split_once("://") else {
        return Err(format!(
            "must be an absolute URI ({}), e.g. s3://bucket/lab.yaml",
            policy.describe()
        ));
    };
    let scheme = match scheme_text.to_ascii_lowercase().as_str() {
        "s3" => UriScheme::S3,
        "file" => UriScheme::File,
        "https" => UriScheme::Https,
        "http" => UriScheme::Http,
        _ => {
            return Err(format!(
                "scheme {scheme_text:?} is not accepted here; use {}",
                policy.describe()
            ));
        }
    };
    if !policy.allows(scheme) {
        return Err(format!(
            "scheme {}:// is not accepted here; use {}",
            scheme.as_str(),
            policy.describe()
        ));
    }
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match scheme {
        UriScheme::S3 => {
            if !is_s3_bucket(authority) {
                return Err(format!(
                    "S3 bucket {authority:?} is not a valid bucket name (3..63 of a-z, 0-9, '.', '-')"
                ));
            }
            let key = path.strip_prefix('/').unwrap_or("");
            if key.is_empty() || !path.starts_with('/') {
                return Err("must name an object: s3://bucket/key".into());
            }
        }
        UriScheme::File => {
            if !(authority.is_empty() || authority.eq_ignore_ascii_case("localhost")) {
                return Err("file URIs must be local: file:///absolute/path".into());
            }
            if !path.starts_with('/') || path.len() < 2 {
                return Err("must name an absolute file: file:///absolute/path".into());
            }
            if path.split('/').any(|seg| seg == "..") {
                return Err("must not contain '..' path segments".into());
            }
        }
        UriScheme::Https | UriScheme::Http => {
            if let Some(why) = authority_problem(authority) {
                return Err(why);
            }
        }
    }
    Ok(scheme)
}

/// A required URI accepted by `policy`.
pub fn uri(v: &mut Violations, field: &str, value: &str, policy: UriPolicy) -> Option<UriScheme> {
    match uri_check(value, policy) {
        Ok(scheme) => Some(scheme),
        Err(why) => {
            v.add(field, why);
            None
        }
    }
}

/// An optional URI: empty → `Some(None)`.
pub fn optional_uri(
    v: &mut Violations,
    field: &str,
    value: &str,
    policy: UriPolicy,
) -> Option<Option<UriScheme>> {
    if value.is_empty() {
        Some(None)
    } else {
        uri(v, field, value, policy).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers and enums
// ---------------------------------------------------------------------------------------------

/// An integer in `min..=max`.
pub fn int_range(v: &mut Violations, field: &str, value: i64, min: i64, max: i64) -> Option<i64> {
    if (min..=max).contains(&value) {
        Some(value)
    } else if value < min {
        v.add(field, format!("must be at least {min}, got {value}"));
        None
    } else {
        v.add(field, format!("must be at most {max}, got {value}"));
        None
    }
}

/// A non-negative `int32` as `u32`.
pub fn non_negative(v: &mut Violations, field: &str, value: i32) -> Option<u32> {
    match u32::try_from(value) {
        Ok(n) => Some(n),
        Err(_) => {
            v.add(field, format!("must not be negative, got {value}"));
            None
        }
    }
}

/// An `int32` in `min..=max` as `u32` (`min` ≥ 0).
pub fn bounded_u32(v: &mut Violations, field: &str, value: i32, min: u32, max: u32) -> Option<u32> {
    int_range(v, field, i64::from(value), i64::from(min), i64::from(max))
        .and_then(|n| u32::try_from(n).ok())
}

/// A protobuf enum field given as its raw number. A number the contract does not define is
/// refused; `0` (`*_UNSPECIFIED`) is refused when `required`, else returned as the default.
pub fn enum_value<E>(v: &mut Violations, field: &str, raw: i32, required: bool) -> Option<E>
where
    E: TryFrom<i32> + Default,
{
    if raw == 0 {
        if required {
            v.add(field, "is required (UNSPECIFIED is not allowed)");
            return None;
        }
        return Some(E::default());
    }
    match E::try_from(raw) {
        Ok(e) => Some(e),
        Err(_) => {
            v.add(field, format!("unknown enum value {raw}"));
            None
        }
    }
}

/// What one instance needs: CPU ≥ 1, memory ≥ 1, storage ≥ 0, each below its sanity bound
/// ([`MAX_CPU_CORES`], [`MAX_MEMORY_GB`], [`MAX_STORAGE_GB`]), plus the AMI requirements'
/// `min_version`s (strict semver). `field` is the path of the `ResourceRequirements` message.
pub fn resource_requirements(
    v: &mut Violations,
    field: &str,
    value: Option<&ccm_proto::v1::ResourceRequirements>,
) -> Option<ResourceRequirements> {
    let Some(r) = value else {
        v.add(field, "is required");
        return None;
    };
    let cpu = bounded(
        v,
        &join_path(field, "cpu_cores"),
        r.cpu_cores,
        1,
        MAX_CPU_CORES,
    );
    let mem = bounded(
        v,
        &join_path(field, "memory_gb"),
        r.memory_gb,
        1,
        MAX_MEMORY_GB,
    );
    let disk = bounded(
        v,
        &join_path(field, "storage_gb"),
        r.storage_gb,
        0,
        MAX_STORAGE_GB,
    );
    let amis = v.absorb(convert::ami_requirements_from_proto(
        &r.ami_requirements,
        &join_path(field, "ami_requirements"),
    ));
    Some(ResourceRequirements {
        cpu_cores: cpu?,
        memory_gb: mem?,
        storage_gb: disk?,
        nested_virt: r.nested_virt,
        ami_requirements: amis?,
    })
}

fn bounded(v: &mut Violations, field: &str, value: i32, min: i64, max: i64) -> Option<u32> {
    int_range(v, field, i64::from(value), min, max).and_then(|n| u32::try_from(n).ok())
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// A booking's time slot, resolved against `now` and the definition's `max_duration`:
///
/// * missing → violation on `field`;
/// * ASAP: start = `now` (the given start is ignored); end = the given end or now +
///   `max_duration`;
/// * otherwise start is required, ≥ now − [`MAX_CLOCK_SKEW`] and ≤ now +
///   [`MAX_BOOKING_HORIZON`]; end defaults to start + `max_duration`;
/// * always end > start and end − start ≤ `max_duration`.
pub fn time_slot(
    v: &mut Violations,
    field: &str,
    slot: Option<&ccm_proto::v1::TimeSlot>,
    now: DateTime<Utc>,
    max_duration: Duration,
) -> Option<TimeSlot> {
    let Some(slot) = slot else {
        v.add(field, "is required");
        return None;
    };
    let start_field = join_path(field, "start");
    let end_field = join_path(field, "end");
    let start = if slot.asap {
        Some(now)
    } else {
        match &slot.start {
            None => {
                v.add(&start_field, "is required unless asap is set");
                None
            }
            Some(ts) => v
                .absorb(convert::timestamp_from_proto(ts, &start_field))
                .and_then(|start| {
                    if start < now - MAX_CLOCK_SKEW {
                        v.add(
                            &start_field,
                            format!("is in the past ({start}); book a future slot or set asap"),
                        );
                        None
                    } else if start > now + MAX_BOOKING_HORIZON {
                        v.add(
                            &start_field,
                            format!("is more than {} days ahead", MAX_BOOKING_HORIZON.num_days()),
                        );
                        None
                    } else {
                        Some(start)
                    }
                }),
        }
    };
    let end = match &slot.end {
        None => None,
        Some(ts) => Some(v.absorb(convert::timestamp_from_proto(ts, &end_field))?),
    };
    let start = start?;
    let end = end.unwrap_or(start + max_duration);
    if end <= start {
        v.add(&end_field, format!("must be after the start ({start})"));
        return None;
    }
    if end - start > max_duration {
        v.add(
            &end_field,
            format!(
                "the slot lasts {} minutes, longer than the definition's maximum of {} minutes",
                (end - start).num_minutes(),
                max_duration.num_minutes()
            ),
        );
        return None;
    }
    Some(TimeSlot {
        start,
        end,
        asap: slot.asap,
    })
}

// ---------------------------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------------------------

/// Limits of a label / tag map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelLimits {
    /// Most entries.
    pub max_entries: usize,
    /// Longest key, in characters (keys must not be empty).
    pub max_key_len: usize,
    /// Longest value, in characters (values may be empty).
    pub max_value_len: usize,
}

impl LabelLimits {
    /// The default limits: [`MAX_LABELS`], [`MAX_LABEL_KEY_LEN`], [`MAX_LABEL_VALUE_LEN`].
    pub const DEFAULT: LabelLimits = LabelLimits {
        max_entries: MAX_LABELS,
        max_key_len: MAX_LABEL_KEY_LEN,
        max_value_len: MAX_LABEL_VALUE_LEN,
    };
}

/// A label / tag map: entry count, key and value lengths, no control characters. Violations
/// name the entry (`tags["Owner"]`).
pub fn labels<'a, I>(v: &mut Violations, field: &str, entries: I, limits: LabelLimits) -> bool
where
    I: IntoIterator<Item = (&'a String, &'a String)>,
{
    let before = v.len();
    let mut count = 0usize;
    for (key, value) in entries {
        count += 1;
        let path = key_path(field, key);
        if key.is_empty() {
            v.add(&path, "keys must not be empty");
        } else if let Some(why) = free_text_problem(key, limits.max_key_len, false) {
            v.add(&path, format!("key {why}"));
        }
        if let Some(why) = free_text_problem(value, limits.max_value_len, false) {
            v.add(&path, format!("value {why}"));
        }
    }
    if count > limits.max_entries {
        v.add(
            field,
            format!(
                "at most {} entries are allowed, got {count}",
                limits.max_entries
            ),
        );
    }
    v.len() == before
}

/// EC2 tags given by a user: [`labels`] with [`LabelLimits::DEFAULT`], and keys starting with
/// [`RESERVED_TAG_PREFIX_AWS`] or [`RESERVED_TAG_PREFIX_CCM`] are refused (AWS reserves the
/// first, ccm manages the second).
pub fn ec2_tags<'a, I>(v: &mut Violations, field: &str, entries: I) -> bool
where
    I: IntoIterator<Item = (&'a String, &'a String)> + Clone,
{
    let before = v.len();
    labels(v, field, entries.clone(), LabelLimits::DEFAULT);
    for (key, _) in entries {
        let lower = key.to_ascii_lowercase();
        if lower.starts_with(RESERVED_TAG_PREFIX_AWS) || lower.starts_with(RESERVED_TAG_PREFIX_CCM)
        {
            v.add(
                key_path(field, key),
                format!(
                    "keys starting with {RESERVED_TAG_PREFIX_AWS:?} or {RESERVED_TAG_PREFIX_CCM:?} \
                     are reserved"
                ),
            );
        }
    }
    v.len() == before
}

// ---------------------------------------------------------------------------------------------
// Lab YAML
// ---------------------------------------------------------------------------------------------

/// A lab YAML checked against a port template: size ≤ [`MAX_LAB_YAML_BYTES`], parses as a CML
/// lab, every placeholder names a port and every port is referenced. Violations: problems of
/// the YAML itself and unknown placeholders on `field` (with their location in the YAML),
/// unreferenced or invalid ports on `ports_field[i].name`.
pub fn lab_yaml(
    v: &mut Violations,
    field: &str,
    yaml: &str,
    ports_field: &str,
    port_names: &[&str],
) -> Option<LabSummary> {
    if yaml.trim().is_empty() {
        v.add(field, "is required");
        return None;
    }
    if yaml.len() > MAX_LAB_YAML_BYTES {
        v.add(
            field,
            format!(
                "is {} bytes; at most {MAX_LAB_YAML_BYTES} bytes are accepted",
                yaml.len()
            ),
        );
        return None;
    }
    let scanned = match labyaml::scan_placeholders(yaml) {
        Ok(scanned) => scanned,
        Err(CoreError::InvalidLabYaml(why)) => {
            v.add(field, format!("invalid lab YAML: {why}"));
            return None;
        }
        Err(other) => {
            v.add(field, other.to_string());
            return None;
        }
    };
    let problems = scanned.port_problems(port_names);
    if problems.is_empty() {
        return v.absorb_core(field, scanned.check_ports(port_names));
    }
    for problem in problems {
        match problem {
            CoreError::UnknownPlaceholder {
                placeholder,
                location,
            } => v.add(
                field,
                format!(
                    "unknown port placeholder {placeholder} at {location}: no port of the port \
                     template has this name"
                ),
            ),
            CoreError::PortWithoutPlaceholder { port_name } => {
                let path = port_names
                    .iter()
                    .position(|p| *p == port_name)
                    .map(|i| join_path(&index_path(ports_field, i), "name"))
                    .unwrap_or_else(|| ports_field.to_owned());
                v.add(
                    path,
                    format!(
                        "port {port_name:?} is not referenced by any placeholder in the lab YAML \
                         (expected {})",
                        labyaml::placeholder_for(&port_name)
                    ),
                );
            }
            CoreError::Invalid { message, .. } => v.add(ports_field, message),
            other => v.add(field, other.to_string()),
        }
    }
    None
}

/// Port names of a port template: each a valid [`port_name`], no duplicates. Returns the names
/// in order when all are valid.
pub fn port_names<'a>(
    v: &mut Violations,
    field: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Option<Vec<&'a str>> {
    let before = v.len();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let path = join_path(&index_path(field, i), "name");
        if port_name(v, &path, name).is_some() && !seen.insert(name) {
            v.add(&path, format!("duplicate port name {name:?}"));
        }
        out.push(name);
    }
    (v.len() == before).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_charset_and_refuse_the_rest() {
        for ok in ["a", "lab-1", "ccna.lab_2", "0", "a1b2"] {
            assert_eq!(resource_name_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a b",
            "<script>alert(1)</script>",
            "ä",
            "a/b",
            ".a",
        ] {
            assert!(resource_name_problem(bad).is_some(), "{bad:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(
            resource_name_problem(&long).is_some_and(|w| w.contains(&MAX_NAME_LEN.to_string()))
        );
        assert_eq!(resource_name_problem(&"a".repeat(MAX_NAME_LEN)), None);
    }

    #[test]
    fn slugify_makes_valid_names() {
        assert_eq!(
            slugify_name("CML Worker #1").as_deref(),
            Some("cml-worker-1")
        );
        assert_eq!(slugify_name("  --  "), None);
        let s = slugify_name(&"Ab ".repeat(100)).unwrap_or_default();
        assert_eq!(resource_name_problem(&s), None);
    }

    #[test]
    fn free_text_keeps_markup_refuses_controls() {
        assert_eq!(
            free_text_problem("<script>alert(1)</script>", 100, false),
            None
        );
        assert!(free_text_problem("a\u{0}b", 100, true).is_some());
        assert!(free_text_problem("a\nb", 100, false).is_some());
        assert_eq!(free_text_problem("a\nb\tc", 100, true), None);
        assert!(free_text_problem("abc\u{202E}gpj.exe", 100, true).is_some());
        assert!(free_text_problem(&"x".repeat(11), 10, true).is_some());
    }

    #[test]
    fn uris_by_scheme() {
        let p = UriPolicy::ARTIFACT;
        assert_eq!(
            uri_check("s3://my-bucket/labs/a.yaml", p),
            Ok(UriScheme::S3)
        );
        assert_eq!(uri_check("file:///srv/labs/a.yaml", p), Ok(UriScheme::File));
        assert_eq!(
            uri_check("https://example.com/a.yaml", p),
            Ok(UriScheme::Https)
        );
        assert_eq!(
            uri_check("HTTPS://example.com:8443/a", p),
            Ok(UriScheme::Https)
        );
        assert_eq!(uri_check("https://[::1]:8443/a", p), Ok(UriScheme::Https));
        for bad in [
            "",
            "http://example.com/a.yaml",
            "ftp://x/y",
            "s3://my-bucket",
            "s3://my-bucket/",
            "s3://B/k",
            "file://host/x",
            "file:///",
            "file:///srv/../etc/passwd",
            "https://user:pw@example.com/",
            "https:///path",
            "https://example.com:99999/",
            "https://exa mple.com/",
            "relative/path.yaml",
        ] {
            assert!(uri_check(bad, p).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            uri_check("http://127.0.0.1:8080/a", UriPolicy::ARTIFACT_ALLOW_HTTP),
            Ok(UriScheme::Http)
        );
        assert!(uri_check("s3://bucket/key", UriPolicy::HTTPS_ONLY).is_err());
    }

    #[test]
    fn enums_refuse_unknown_and_required_unspecified() {
        use ccm_proto::v1::LicenseType;
        let mut v = Violations::new();
        assert_eq!(
            enum_value::<LicenseType>(&mut v, "a", 1, true),
            Some(LicenseType::Personal)
        );
        assert_eq!(enum_value::<LicenseType>(&mut v, "b", 0, true), None);
        assert_eq!(
            enum_value::<LicenseType>(&mut v, "c", 0, false),
            Some(LicenseType::Unspecified)
        );
        assert_eq!(enum_value::<LicenseType>(&mut v, "d", 99, false), None);
        let fields: Vec<&str> = v.iter().map(|x| x.field.as_str()).collect();
        assert_eq!(fields, ["b", "d"]);
    }
}
