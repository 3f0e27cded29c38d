//! The [`CloudProvider`] trait: everything the controller asks of a cloud (domain.md §6,
//! legacy-features.md §3). Implementations: [`crate::aws`] (EC2 via aws-sdk-ec2) and
//! [`crate::simulated`] (dev mode and simulations).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::CloudError;

/// Tag every ccm-created instance carries (`"true"`); Describe filters on it.
pub const TAG_MANAGED: &str = "ccm:managed";
/// Tag naming the worker template an instance was launched from.
pub const TAG_TEMPLATE: &str = "ccm:template";
/// Tag carrying the ccm worker id (ties an EC2 instance back to its record).
pub const TAG_WORKER_ID: &str = "ccm:worker-id";
/// EC2's display-name tag.
pub const TAG_NAME: &str = "Name";

/// Tag-key prefix AWS reserves for itself; such keys cannot be set.
pub const RESERVED_AWS_TAG_PREFIX: &str = "aws:";
/// Most tags EC2 allows on one resource.
pub const MAX_TAGS_PER_RESOURCE: usize = 50;
/// Longest tag key EC2 accepts, in characters.
pub const MAX_TAG_KEY_CHARS: usize = 128;
/// Longest tag value EC2 accepts, in characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;
/// Longest EC2 idempotency token (`ClientToken`), so the longest [`LaunchRequest::worker_id`].
pub const MAX_WORKER_ID_CHARS: usize = 64;
/// Largest root volume EC2 allows (16 TiB), in GiB.
pub const MAX_VOLUME_SIZE_GIB: u32 = 16_384;

/// EC2's instance lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// `pending`.
    Pending,
    /// `running`.
    Running,
    /// `stopping`.
    Stopping,
    /// `stopped`.
    Stopped,
    /// `shutting-down`.
    ShuttingDown,
    /// `terminated`.
    Terminated,
    /// Anything else the API returned.
    Unknown,
}

impl InstanceState {
    /// EC2's spelling (`running`, `shutting-down`, …); what `ccm_core` worker observations take.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Unknown => "unknown",
        }
    }

    /// Parses EC2's spelling; anything unknown is [`InstanceState::Unknown`].
    pub fn parse(text: &str) -> Self {
        match text {
            "pending" => InstanceState::Pending,
            "running" => InstanceState::Running,
            "stopping" => InstanceState::Stopping,
            "stopped" => InstanceState::Stopped,
            "shutting-down" => InstanceState::ShuttingDown,
            "terminated" => InstanceState::Terminated,
            _ => InstanceState::Unknown,
        }
    }
}

/// What to launch: one worker from a template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchRequest {
    /// The ccm worker id (tagged [`TAG_WORKER_ID`]; also the idempotency client token, so a
    /// retried launch never creates a second instance).
    pub worker_id: String,
    /// Display name (tag `Name`).
    pub name: String,
    /// The worker template (tag [`TAG_TEMPLATE`]).
    pub template_name: String,
    /// EC2 instance type, e.g. `m5zn.metal`.
    pub instance_type: String,
    /// The image: an explicit AMI id, or empty to look one up by `ami_name_pattern`.
    pub ami_id: String,
    /// Glob on AMI names (`cml-2.7.*`); the newest match wins.
    pub ami_name_pattern: String,
    /// Subnet (empty: the default VPC's).
    pub subnet_id: String,
    /// Security groups (`sg-…`).
    pub security_group_ids: Vec<String>,
    /// SSH key pair name (empty: none).
    pub key_name: String,
    /// Root volume size in GiB (0: the image's).
    pub volume_size_gib: u32,
    /// Extra tags (the template's); the ccm tags are added by the provider.
    pub tags: BTreeMap<String, String>,
}

impl LaunchRequest {
    /// Checks what any cloud would refuse, before calling it: a worker id (non-empty, at most
    /// [`MAX_WORKER_ID_CHARS`] printable ASCII characters: it is the idempotency token), an
    /// instance type, an image (id or name pattern), a sane volume size and valid tags.
    pub fn validate(&self) -> Result<(), CloudError> {
        let bad = |what: String| Err(CloudError::InvalidRequest(what));
        if self.worker_id.is_empty() {
            return bad("launch request: worker_id is empty".to_owned());
        }
        if self.worker_id.chars().count() > MAX_WORKER_ID_CHARS
            || !self.worker_id.chars().all(|c| c.is_ascii_graphic())
        {
            return bad(format!(
                "launch request: worker_id {:?} must be 1..={MAX_WORKER_ID_CHARS} printable ASCII \
                 characters (it is the EC2 client token)",
                self.worker_id
            ));
        }
        if self.instance_type.trim().is_empty() {
            return bad(format!(
                "launch request for worker {}: instance_type is empty",
                self.worker_id
            ));
        }
        if self.ami_id.trim().is_empty() && self.ami_name_pattern.trim().is_empty() {
            return bad(format!(
                "launch request for worker {}: neither ami_id nor ami_name_pattern is set",
                self.worker_id
            ));
        }
        if self.volume_size_gib > MAX_VOLUME_SIZE_GIB {
            return bad(format!(
                "launch request for worker {}: volume_size_gib {} exceeds {MAX_VOLUME_SIZE_GIB}",
                self.worker_id, self.volume_size_gib
            ));
        }
        validate_tags(&self.tags)?;
        if self.tags.len() + 4 > MAX_TAGS_PER_RESOURCE {
            return bad(format!(
                "launch request for worker {}: {} template tags plus the 4 ccm tags exceed \
                 {MAX_TAGS_PER_RESOURCE}",
                self.worker_id,
                self.tags.len()
            ));
        }
        Ok(())
    }

    /// Every tag the launched instance carries: the template's [`LaunchRequest::tags`], then
    /// `Name` ([`LaunchRequest::name`], or the worker id when empty), [`TAG_MANAGED`] = `true`,
    /// [`TAG_TEMPLATE`] and [`TAG_WORKER_ID`]. The ccm tags win over template tags of the same key.
    pub fn instance_tags(&self) -> BTreeMap<String, String> {
        let mut tags = self.tags.clone();
        let name = if self.name.is_empty() {
            &self.worker_id
        } else {
            &self.name
        };
        tags.insert(TAG_NAME.to_owned(), name.clone());
        tags.insert(TAG_MANAGED.to_owned(), "true".to_owned());
        tags.insert(TAG_TEMPLATE.to_owned(), self.template_name.clone());
        tags.insert(TAG_WORKER_ID.to_owned(), self.worker_id.clone());
        tags
    }
}

/// Checks tags to set: keys non-empty, at most [`MAX_TAG_KEY_CHARS`], not under
/// [`RESERVED_AWS_TAG_PREFIX`]; values at most [`MAX_TAG_VALUE_CHARS`].
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), CloudError> {
    for (key, value) in tags {
        validate_tag_key(key)?;
        if value.chars().count() > MAX_TAG_VALUE_CHARS {
            return Err(CloudError::InvalidRequest(format!(
                "tag {key:?}: value longer than {MAX_TAG_VALUE_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// Checks one tag key (see [`validate_tags`]).
pub fn validate_tag_key(key: &str) -> Result<(), CloudError> {
    if key.is_empty() {
        return Err(CloudError::InvalidRequest("empty tag key".to_owned()));
    }
    if key.chars().count() > MAX_TAG_KEY_CHARS {
        return Err(CloudError::InvalidRequest(format!(
            "tag key {key:?} longer than {MAX_TAG_KEY_CHARS} characters"
        )));
    }
    if key
        .to_ascii_lowercase()
        .starts_with(RESERVED_AWS_TAG_PREFIX)
    {
        return Err(CloudError::InvalidRequest(format!(
            "tag key {key:?}: the prefix {RESERVED_AWS_TAG_PREFIX:?} is reserved by AWS"
        )));
    }
    Ok(())
}

/// Whether `name` matches the EC2 filter glob `pattern` (`*` any run of characters, `?` one
/// character; everything else literal, case-sensitive).
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with backtracking to the last `*`.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The newest image: latest [`CloudImage::creation_date`] (ISO 8601 sorts as text), ties broken by
/// the greater name, then the greater id, so the choice never depends on the order the cloud
/// listed them in.
pub fn newest_image(images: impl IntoIterator<Item = CloudImage>) -> Option<CloudImage> {
    images.into_iter().max_by(|a, b| {
        a.creation_date
            .cmp(&b.creation_date)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.image_id.cmp(&b.image_id))
    })
}

/// One instance as the cloud describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInstance {
    /// `i-…`.
    pub instance_id: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Instance type.
    pub instance_type: String,
    /// AMI id.
    pub image_id: String,
    /// Public IPv4, if any.
    pub public_ip: Option<String>,
    /// Private IPv4, if any.
    pub private_ip: Option<String>,
    /// When it was (last) launched.
    pub launch_time: Option<DateTime<Utc>>,
    /// Every tag.
    pub tags: BTreeMap<String, String>,
}

impl CloudInstance {
    /// The `Name` tag, if any.
    pub fn name(&self) -> Option<&str> {
        self.tags.get(TAG_NAME).map(String::as_str)
    }
}

/// A machine image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudImage {
    /// `ami-…`.
    pub image_id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Creation date as EC2 reports it (ISO 8601, `2026-01-15T09:00:00.000Z`).
    pub creation_date: String,
    /// The root device (`/dev/xvda`, `/dev/sda1`): where [`LaunchRequest::volume_size_gib`]
    /// applies. `None` when the cloud did not say.
    pub root_device_name: Option<String>,
}

/// Which instances to list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListFilter {
    /// Only instances tagged [`TAG_MANAGED`] = `true` (what the controller reconciles).
    pub managed_only: bool,
    /// Only these instance ids (empty: all).
    pub instance_ids: Vec<String>,
    /// Only instances with these tags (`key = value`).
    pub tags: BTreeMap<String, String>,
    /// Include terminated instances.
    pub include_terminated: bool,
}

/// A cloud the controller can run workers on.
#[async_trait]
pub trait CloudProvider: Send + Sync + std::fmt::Debug {
    /// `aws` or `simulated` (logs, metrics, `GetStatus`).
    fn kind(&self) -> &'static str;

    /// Launches one instance; returns it as first described (usually `pending`). Idempotent on
    /// [`LaunchRequest::worker_id`].
    async fn launch(&self, request: &LaunchRequest) -> Result<CloudInstance, CloudError>;

    /// Starts a stopped instance (no-op if running).
    async fn start(&self, instance_id: &str) -> Result<(), CloudError>;

    /// Stops a running instance (no-op if stopped).
    async fn stop(&self, instance_id: &str) -> Result<(), CloudError>;

    /// Terminates an instance; an instance that is already gone is not an error.
    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError>;

    /// One instance, or `None` when the cloud does not know it.
    async fn describe(&self, instance_id: &str) -> Result<Option<CloudInstance>, CloudError>;

    /// Every instance matching `filter` (all pages).
    async fn list(&self, filter: &ListFilter) -> Result<Vec<CloudInstance>, CloudError>;

    /// Sets `set` and removes `remove` on an instance's tags.
    async fn update_tags(
        &self,
        instance_id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), CloudError>;

    /// The newest image whose name matches the glob `name_pattern`, if any.
    async fn find_image(&self, name_pattern: &str) -> Result<Option<CloudImage>, CloudError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LaunchRequest {
        LaunchRequest {
            worker_id: "w-1".into(),
            name: "worker one".into(),
            template_name: "small".into(),
            instance_type: "m5.large".into(),
            ami_id: "ami-0123".into(),
            ..LaunchRequest::default()
        }
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_matches("cml-2.7.*", "cml-2.7.0-lablet"));
        assert!(glob_matches("*lablet*", "my-cml2.7.0-lablet-v0.1.0"));
        assert!(glob_matches("cml-?.8", "cml-2.8"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a*b*c", "aXXbYYbc"));
        assert!(!glob_matches("cml-2.7.*", "cml-2.8.0"));
        assert!(!glob_matches("cml-?.8", "cml-22.8"));
        assert!(!glob_matches("CML*", "cml-2.7"));
        assert!(!glob_matches("abc", "abcd"));
        assert!(!glob_matches("", "x"));
    }

    fn image(id: &str, name: &str, date: &str) -> CloudImage {
        CloudImage {
            image_id: id.into(),
            name: name.into(),
            description: String::new(),
            creation_date: date.into(),
            root_device_name: None,
        }
    }

    #[test]
    fn newest_image_by_date_then_name() {
        let old = image("ami-1", "z-old", "2025-01-01T00:00:00.000Z");
        let new = image("ami-2", "a-new", "2026-01-01T00:00:00.000Z");
        let tie = image("ami-3", "b-tie", "2026-01-01T00:00:00.000Z");
        let pick = newest_image([old.clone(), new.clone()]).expect("one");
        assert_eq!(pick.image_id, "ami-2");
        let pick = newest_image([tie.clone(), old, new]).expect("one");
        assert_eq!(pick.image_id, "ami-3", "same date: greater name wins");
        assert!(newest_image(Vec::new()).is_none());
    }

    #[test]
    fn validation_rejects_bad_requests_with_reasons() {
        assert_eq!(request().validate(), Ok(()));
        let cases: Vec<(LaunchRequest, &str)> = vec![
            (
                LaunchRequest {
                    worker_id: String::new(),
                    ..request()
                },
                "worker_id is empty",
            ),
            (
                LaunchRequest {
                    worker_id: "x".repeat(65),
                    ..request()
                },
                "client token",
            ),
            (
                LaunchRequest {
                    worker_id: "a b".into(),
                    ..request()
                },
                "printable ASCII",
            ),
            (
                LaunchRequest {
                    instance_type: " ".into(),
                    ..request()
                },
                "instance_type",
            ),
            (
                LaunchRequest {
                    ami_id: String::new(),
                    ami_name_pattern: String::new(),
                    ..request()
                },
                "neither ami_id nor ami_name_pattern",
            ),
            (
                LaunchRequest {
                    volume_size_gib: 20_000,
                    ..request()
                },
                "volume_size_gib",
            ),
            (
                LaunchRequest {
                    tags: BTreeMap::from([("aws:cloudformation".into(), "x".into())]),
                    ..request()
                },
                "reserved by AWS",
            ),
            (
                LaunchRequest {
                    tags: BTreeMap::from([(String::new(), "x".into())]),
                    ..request()
                },
                "empty tag key",
            ),
            (
                LaunchRequest {
                    tags: (0..47).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
                    ..request()
                },
                "exceed 50",
            ),
        ];
        for (req, expected) in cases {
            match req.validate() {
                Err(CloudError::InvalidRequest(text)) => {
                    assert!(text.contains(expected), "{text:?} lacks {expected:?}")
                }
                other => panic!("{req:?}: expected InvalidRequest, got {other:?}"),
            }
        }
        assert!(matches!(
            validate_tags(&BTreeMap::from([("k".into(), "v".repeat(257))])),
            Err(CloudError::InvalidRequest(_))
        ));
    }

    #[test]
    fn instance_tags_add_ccm_tags_which_win() {
        let req = LaunchRequest {
            tags: BTreeMap::from([
                ("team".into(), "net".into()),
                (TAG_WORKER_ID.into(), "spoofed".into()),
            ]),
            ..request()
        };
        let tags = req.instance_tags();
        assert_eq!(tags.get("team").map(String::as_str), Some("net"));
        assert_eq!(tags.get(TAG_WORKER_ID).map(String::as_str), Some("w-1"));
        assert_eq!(tags.get(TAG_MANAGED).map(String::as_str), Some("true"));
        assert_eq!(tags.get(TAG_TEMPLATE).map(String::as_str), Some("small"));
        assert_eq!(tags.get(TAG_NAME).map(String::as_str), Some("worker one"));
        let unnamed = LaunchRequest {
            name: String::new(),
            ..request()
        }
        .instance_tags();
        assert_eq!(unnamed.get(TAG_NAME).map(String::as_str), Some("w-1"));
    }

    #[test]
    fn state_names_round_trip() {
        for state in [
            InstanceState::Pending,
            InstanceState::Running,
            InstanceState::Stopping,
            InstanceState::Stopped,
            InstanceState::ShuttingDown,
            InstanceState::Terminated,
        ] {
            assert_eq!(InstanceState::parse(state.as_str()), state);
        }
        assert_eq!(InstanceState::parse("rebooting"), InstanceState::Unknown);
    }
}
