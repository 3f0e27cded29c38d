//! Versions of lablet definitions (strict semver `MAJOR.MINOR.PATCH`) and artifact hashes.
//!
//! Two parsers live here, on purpose different:
//!
//! * [`Version::from_str`](std::str::FromStr) is **strict**. It is how a definition version is
//!   read from a client, from storage or from an event: exactly three dot-separated decimal
//!   numbers, no leading zeros, no whitespace, no `v` prefix, no pre-release or build suffix.
//!   A definition version is an identity (Mongo indexes `(name, version)`), so two spellings of
//!   one version must not exist.
//! * [`Version::parse_lenient`] reads a CML version *observed* on a worker or an AMI (for example
//!   `2.9`, `2.9.1+build42`, `v2.9.0-rc1`). Those strings come from elsewhere and are not ours to
//!   reject; it takes the leading numeric parts and ignores the rest. It is used only to compare
//!   against an AMI requirement's `min_version` ([`Version::is_satisfied_by`]), never to name a
//!   definition.
//!
//! Hashes: a lab artifact's hash is SHA-256. Definitions store the bare lowercase hex
//! ([`sha256_hex`]); events carry `sha256:<hex>` ([`content_hash`]); [`parse_content_hash`] reads
//! either form. [`next_version_on_sync`] decides the automatic PATCH bump of domain.md §11.15.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{CoreError, CoreResult};

/// A definition version: `MAJOR.MINOR.PATCH`, compared numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// Incompatible changes.
    pub major: u64,
    /// Compatible additions.
    pub minor: u64,
    /// Fixes; bumped automatically when an artifact's hash changes.
    pub patch: u64,
}

/// Names of the three parts, for error messages.
const PART_NAMES: [&str; 3] = ["major", "minor", "patch"];

impl Version {
    /// A version from its three parts.
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// The next major version: `1.4.2` → `2.0.0`. Saturates at `u64::MAX`.
    #[must_use]
    pub const fn bump_major(self) -> Self {
        Version::new(self.major.saturating_add(1), 0, 0)
    }

    /// The next minor version: `1.4.2` → `1.5.0`. Saturates at `u64::MAX`.
    #[must_use]
    pub const fn bump_minor(self) -> Self {
        Version::new(self.major, self.minor.saturating_add(1), 0)
    }

    /// The next patch version: `1.4.2` → `1.4.3`. Saturates at `u64::MAX`.
    #[must_use]
    pub const fn bump_patch(self) -> Self {
        Version::new(self.major, self.minor, self.patch.saturating_add(1))
    }

    /// Lenient parse of an *observed* CML version (worker or AMI), unlike the strict
    /// [`FromStr`]: surrounding whitespace and one leading `v`/`V` are ignored, then up to three
    /// dot-separated runs of digits are read (leading zeros allowed) and anything after them is
    /// ignored (`+build`, `-rc1`, a fourth part). Missing parts are 0: `2.9` → `2.9.0`,
    /// `2.9.1+build` → `2.9.1`, `2.9.1.4` → `2.9.1`.
    ///
    /// `None` if the string does not start with a digit (after the optional `v`) or a part
    /// overflows `u64`.
    pub fn parse_lenient(s: &str) -> Option<Version> {
        let s = s.trim();
        let mut rest = s
            .strip_prefix('v')
            .or_else(|| s.strip_prefix('V'))
            .unwrap_or(s);
        let mut parts = [0u64; 3];
        for (i, slot) in parts.iter_mut().enumerate() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                if i == 0 {
                    return None;
                }
                break;
            }
            *slot = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            // Continue only over a '.' that is followed by another number.
            match rest.strip_prefix('.') {
                Some(after) if after.starts_with(|c: char| c.is_ascii_digit()) => rest = after,
                _ => break,
            }
        }
        Some(Version::new(parts[0], parts[1], parts[2]))
    }

    /// Whether an observed CML version (read with [`Version::parse_lenient`]) is at least `self`,
    /// the `min_version` of an AMI requirement. An observed version that cannot be read does not
    /// satisfy any minimum: placement must not bet on an unknown CML.
    pub fn is_satisfied_by(&self, observed_cml_version: &str) -> bool {
        Version::parse_lenient(observed_cml_version).is_some_and(|observed| observed >= *self)
    }
}

/// Whether the observed CML version `observed` satisfies `min_version`; both are read leniently
/// ([`Version::parse_lenient`]), so `"2.9"` as a minimum means `2.9.0`. Either one unreadable →
/// `false`. Prefer [`Version::is_satisfied_by`] when the minimum is already a [`Version`].
pub fn min_version_satisfied(observed: &str, min_version: &str) -> bool {
    Version::parse_lenient(min_version).is_some_and(|min| min.is_satisfied_by(observed))
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for Version {
    type Err = CoreError;

    /// Strict `MAJOR.MINOR.PATCH`; see the module docs for what is refused and why.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| CoreError::InvalidVersion {
            input: s.to_owned(),
            why,
        };
        if s.is_empty() {
            return Err(fail("empty; expected MAJOR.MINOR.PATCH, e.g. 1.0.0".into()));
        }
        if s.trim() != s {
            return Err(fail("surrounding whitespace is not allowed".into()));
        }
        if s.starts_with(['v', 'V']) {
            return Err(fail(
                "a leading 'v' is not accepted; write MAJOR.MINOR.PATCH, e.g. 1.0.0".into(),
            ));
        }
        // A '-' or '+' after the first character is a semver suffix ("1.2.3-rc.1"); a leading
        // one is just not a number and is reported as such below.
        if let Some(pos) = s.find(['-', '+']).filter(|&pos| pos > 0) {
            let kind = if s.as_bytes()[pos] == b'-' {
                "pre-release"
            } else {
                "build metadata"
            };
            return Err(fail(format!(
                "{kind} suffix {:?} is not accepted; definition versions are plain MAJOR.MINOR.PATCH",
                &s[pos..]
            )));
        }
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() != 3 {
            return Err(fail(format!(
                "expected 3 dot-separated parts MAJOR.MINOR.PATCH, found {}",
                parts.len()
            )));
        }
        let mut numbers = [0u64; 3];
        for ((slot, part), name) in numbers.iter_mut().zip(&parts).zip(PART_NAMES) {
            if part.is_empty() {
                return Err(fail(format!("the {name} part is empty")));
            }
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail(format!(
                    "the {name} part {part:?} is not a number (digits 0-9 only)"
                )));
            }
            if part.len() > 1 && part.starts_with('0') {
                return Err(fail(format!("the {name} part {part:?} has a leading zero")));
            }
            *slot = part.parse().map_err(|_| {
                fail(format!(
                    "the {name} part {part} overflows (max {})",
                    u64::MAX
                ))
            })?;
        }
        Ok(Version::new(numbers[0], numbers[1], numbers[2]))
    }
}

impl serde::Serialize for Version {
    /// As the string `MAJOR.MINOR.PATCH`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    /// From the string `MAJOR.MINOR.PATCH`, strictly.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VersionVisitor;

        impl serde::de::Visitor<'_> for VersionVisitor {
            type Value = Version;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a version string MAJOR.MINOR.PATCH")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Version, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(VersionVisitor)
    }
}

/// Prefix of the hash form carried by events.
const SHA256_PREFIX: &str = "sha256:";

/// SHA-256 of `bytes` as 64 lowercase hex digits (the form a definition stores).
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for byte in digest.iter() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

/// SHA-256 of `bytes` as `sha256:<64 lowercase hex>`, the form events carry.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{SHA256_PREFIX}{}", sha256_hex(bytes))
}

/// Reads a SHA-256 hash given either bare (`<hex>`) or prefixed (`sha256:<hex>`) and returns the
/// bare lowercase hex. Upper-case hex digits are accepted and lowered.
///
/// Errors with [`CoreError::Invalid`] (field `hash`) for another algorithm prefix, a wrong
/// length or a non-hex character.
pub fn parse_content_hash(s: &str) -> CoreResult<String> {
    let hex = match s.split_once(':') {
        Some((algo, hex)) if algo.eq_ignore_ascii_case("sha256") => hex,
        Some((algo, _)) => {
            return Err(CoreError::invalid(
                "hash",
                format!("unsupported hash algorithm {algo:?}; only sha256 is used"),
            ));
        }
        None => s,
    };
    if hex.len() != 64 {
        return Err(CoreError::invalid(
            "hash",
            format!(
                "a SHA-256 hash is 64 hex digits, got {} characters",
                hex.chars().count()
            ),
        ));
    }
    if let Some(bad) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(CoreError::invalid(
            "hash",
            format!("{bad:?} is not a hex digit"),
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// The version a definition gets when its artifact is synced (domain.md §11.15): a changed hash
/// makes a new PATCH version, an unchanged one returns `None` (nothing to create).
///
/// Hashes are compared in canonical form when both parse ([`parse_content_hash`]), so
/// `sha256:ABC…` and `abc…` are the same hash; if either does not parse they are compared as
/// given, so an unreadable stored hash still yields a new version once the content differs.
pub fn next_version_on_sync(
    current: Version,
    current_hash: &str,
    new_hash: &str,
) -> Option<Version> {
    let unchanged = match (
        parse_content_hash(current_hash),
        parse_content_hash(new_hash),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => current_hash == new_hash,
    };
    if unchanged {
        None
    } else {
        Some(current.bump_patch())
    }
}
