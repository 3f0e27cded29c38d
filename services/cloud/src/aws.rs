//! [`Ec2Provider`]: the [`CloudProvider`] on AWS EC2, with aws-sdk-ec2.
//!
//! Calls made (and so the IAM actions the controller's role needs): `ec2:DescribeInstances`,
//! `ec2:RunInstances`, `ec2:StartInstances`, `ec2:StopInstances`, `ec2:TerminateInstances`,
//! `ec2:CreateTags` (also needed by RunInstances' tag specifications), `ec2:DeleteTags`,
//! `ec2:DescribeImages`. docs/cloud.md has the table and a policy.
//!
//! Retries: the SDK's *standard* retry mode with [`AwsSettings::max_attempts`] attempts and
//! exponential backoff with jitter between [`AwsSettings::initial_backoff`] and
//! [`AwsSettings::max_backoff`]. It retries throttling codes (`RequestLimitExceeded`, …),
//! transient errors, 5xx answers, timeouts and connection failures; once attempts run out the
//! error is classified by [`classify_error_code`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, Image, Instance, InstanceType, ResourceType,
    RunInstancesMonitoringEnabled, Tag, TagSpecification, VolumeType,
};
use chrono::{DateTime, Utc};
use tracing::{debug, info, instrument};

use crate::error::CloudError;
use crate::provider::{
    CloudImage, CloudInstance, CloudProvider, InstanceState, LaunchRequest, ListFilter,
    TAG_MANAGED, TAG_WORKER_ID, newest_image, validate_tag_key, validate_tags,
};

/// Attempts per EC2 call, the first included (the SDK's default is 3; EC2 throttles bursts, so
/// ccm allows more).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Base of the exponential backoff between attempts (the SDK's default).
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two attempts (the SDK's default).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(20);
/// Time allowed to open a connection to the EC2 endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one attempt of one call.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for one call, every retry and backoff included.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(120);
/// `MaxResults` of each DescribeInstances page (EC2 allows 5..=1000).
pub const DEFAULT_PAGE_SIZE: i32 = 1000;
/// Smallest `MaxResults` EC2 accepts for DescribeInstances.
pub const MIN_PAGE_SIZE: i32 = 5;
/// Largest `MaxResults` EC2 accepts for DescribeInstances.
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Device name used for the root volume when the image does not name its root device.
pub const FALLBACK_ROOT_DEVICE: &str = "/dev/xvda";
/// Name under which static credentials are reported in the SDK's logs.
const STATIC_CREDENTIALS_PROVIDER: &str = "ccm-static";

/// EC2 error codes meaning "credentials missing, wrong or not allowed".
pub const AUTH_ERROR_CODES: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "RequestExpired",
    "OptInRequired",
    "Blocked",
    "PendingVerification",
];
/// EC2 error codes meaning "the instance does not exist" (anything else that is not found is a
/// wrong request, e.g. `InvalidAMIID.NotFound`).
pub const NOT_FOUND_ERROR_CODES: &[&str] = &["InvalidInstanceID.NotFound"];
/// EC2 error codes meaning an account or capacity limit.
pub const QUOTA_ERROR_CODES: &[&str] = &[
    "InstanceLimitExceeded",
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "VolumeLimitExceeded",
    "ResourceLimitExceeded",
    "TagLimitExceeded",
];
/// EC2 error codes meaning "slow down" (left after the SDK's retries).
pub const THROTTLE_ERROR_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "EC2ThrottledException",
    "RequestThrottled",
    "BandwidthLimitExceeded",
];
/// EC2 error codes meaning the service failed; try again later.
pub const UNAVAILABLE_ERROR_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Where the provider gets AWS credentials from.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum AwsCredentials {
    /// The SDK's default chain: environment, profile, web identity, ECS and instance metadata.
    #[default]
    DefaultChain,
    /// Fixed keys (moto, or a dedicated user).
    Static {
        /// `AKIA…`.
        access_key_id: String,
        /// The secret.
        secret_access_key: String,
        /// For temporary credentials.
        session_token: Option<String>,
    },
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AwsCredentials::DefaultChain => f.write_str("DefaultChain"),
            AwsCredentials::Static { access_key_id, .. } => f
                .debug_struct("Static")
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &"<redacted>")
                .finish_non_exhaustive(),
        }
    }
}

/// How to reach EC2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// The region, e.g. `us-east-1`.
    pub region: String,
    /// Another endpoint than AWS's (the moto server in tests).
    pub endpoint_url: Option<String>,
    /// Where credentials come from.
    pub credentials: AwsCredentials,
    /// Attempts per call, the first included (≥ 1).
    pub max_attempts: u32,
    /// Base of the exponential backoff.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Timeout of one call with its retries.
    pub operation_timeout: Duration,
    /// DescribeInstances page size ([`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`]).
    pub page_size: i32,
    /// Owners DescribeImages searches when looking an image up by name (`self`, an account id,
    /// `amazon`); empty: every image the account can launch, public ones included (slower).
    pub image_owners: Vec<String>,
}

impl AwsSettings {
    /// Settings for `region` with every other field at its documented default.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            credentials: AwsCredentials::DefaultChain,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            page_size: DEFAULT_PAGE_SIZE,
            image_owners: Vec::new(),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), CloudError> {
        let bad = |what: String| Err(CloudError::InvalidRequest(format!("AWS settings: {what}")));
        if self.region.trim().is_empty() {
            return bad("region is empty".to_owned());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".to_owned());
        }
        if self.initial_backoff > self.max_backoff {
            return bad(format!(
                "initial_backoff {:?} exceeds max_backoff {:?}",
                self.initial_backoff, self.max_backoff
            ));
        }
        if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return bad(format!(
                "page_size {} outside {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}",
                self.page_size
            ));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad(format!("endpoint_url {url:?} is not an http(s) URL"));
        }
        if let AwsCredentials::Static {
            access_key_id,
            secret_access_key,
            ..
        } = &self.credentials
            && (access_key_id.is_empty() || secret_access_key.is_empty())
        {
            return bad("static credentials need an access key id and a secret".to_owned());
        }
        Ok(())
    }

    fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(self.max_backoff)
    }

    fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .operation_attempt_timeout(self.attempt_timeout)
            .operation_timeout(self.operation_timeout)
            .build()
    }
}

/// The [`CloudProvider`] on AWS EC2.
#[derive(Debug, Clone)]
pub struct Ec2Provider {
    client: Client,
    settings: AwsSettings,
}

impl Ec2Provider {
    /// Builds the client (loading credentials from the default chain when asked to).
    pub async fn new(settings: AwsSettings) -> Result<Self, CloudError> {
        settings.validate()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .retry_config(settings.retry_config())
            .timeout_config(settings.timeout_config());
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let AwsCredentials::Static {
            access_key_id,
            secret_access_key,
            session_token,
        } = &settings.credentials
        {
            loader = loader.credentials_provider(Credentials::new(
                access_key_id.clone(),
                secret_access_key.clone(),
                session_token.clone(),
                None,
                STATIC_CREDENTIALS_PROVIDER,
            ));
        }
        let sdk_config = loader.load().await;
        Ok(Self {
            client: Client::new(&sdk_config),
            settings,
        })
    }

    /// The SDK client (for tooling and tests that seed images).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &AwsSettings {
        &self.settings
    }

    /// Every instance matching `filters` (all pages).
    async fn describe_all(&self, filters: Vec<Filter>) -> Result<Vec<CloudInstance>, CloudError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0u32;
        loop {
            let response = self
                .client
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .max_results(self.settings.page_size)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| sdk_error("DescribeInstances", e))?;
            pages += 1;
            out.extend(
                response
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .map(to_cloud_instance),
            );
            match response.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => break,
            }
        }
        debug!(pages, instances = out.len(), "described instances");
        Ok(out)
    }

    /// The image `ami_id`, or an [`CloudError::InvalidRequest`] naming it.
    async fn image_by_id(&self, ami_id: &str) -> Result<CloudImage, CloudError> {
        let response = self
            .client
            .describe_images()
            .image_ids(ami_id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", e))?;
        response
            .images()
            .iter()
            .map(to_cloud_image)
            .next()
            .ok_or_else(|| CloudError::InvalidRequest(format!("image {ami_id} does not exist")))
    }

    /// The instance of a launch already made for `worker_id`, if any (any state but terminated).
    async fn existing_launch(&self, worker_id: &str) -> Result<Option<CloudInstance>, CloudError> {
        let filters = vec![
            filter(format!("tag:{TAG_WORKER_ID}"), [worker_id]),
            filter("instance-state-name", LIVE_STATES),
        ];
        let mut found = self.describe_all(filters).await?;
        // Oldest first: if an earlier bug launched two, keep reporting the same one.
        found.sort_by(|a, b| {
            a.launch_time
                .cmp(&b.launch_time)
                .then_with(|| a.instance_id.cmp(&b.instance_id))
        });
        Ok(found.into_iter().next())
    }
}

/// Every state but `terminated`.
const LIVE_STATES: [&str; 5] = ["pending", "running", "stopping", "stopped", "shutting-down"];

fn filter<I, V>(name: impl Into<String>, values: I) -> Filter
where
    I: IntoIterator<Item = V>,
    V: Into<String>,
{
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

fn tag_list(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

#[async_trait]
impl CloudProvider for Ec2Provider {
    fn kind(&self) -> &'static str {
        "aws"
    }

    #[instrument(skip_all, fields(worker_id = %request.worker_id, template = %request.template_name))]
    async fn launch(&self, request: &LaunchRequest) -> Result<CloudInstance, CloudError> {
        request.validate()?;
        // The ClientToken makes RunInstances idempotent at AWS; this lookup also covers emulators
        // that ignore it and tokens AWS has forgotten.
        if let Some(existing) = self.existing_launch(&request.worker_id).await? {
            info!(instance_id = %existing.instance_id, "already launched for this worker");
            return Ok(existing);
        }
        let image = if request.ami_id.trim().is_empty() {
            self.find_image(&request.ami_name_pattern)
                .await?
                .ok_or_else(|| {
                    CloudError::InvalidRequest(format!(
                        "no image name matches {:?}",
                        request.ami_name_pattern
                    ))
                })?
        } else {
            self.image_by_id(request.ami_id.trim()).await?
        };
        let tags = tag_list(&request.instance_tags());
        let mut run = self
            .client
            .run_instances()
            .image_id(&image.image_id)
            .instance_type(InstanceType::from(request.instance_type.trim()))
            .min_count(1)
            .max_count(1)
            .client_token(&request.worker_id)
            .monitoring(
                RunInstancesMonitoringEnabled::builder()
                    .enabled(true)
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            );
        if !request.subnet_id.is_empty() {
            run = run.subnet_id(&request.subnet_id);
        }
        if !request.security_group_ids.is_empty() {
            run = run.set_security_group_ids(Some(request.security_group_ids.clone()));
        }
        if !request.key_name.is_empty() {
            run = run.key_name(&request.key_name);
        }
        if request.volume_size_gib > 0 {
            let device = image
                .root_device_name
                .clone()
                .unwrap_or_else(|| FALLBACK_ROOT_DEVICE.to_owned());
            run = run.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(i32::try_from(request.volume_size_gib).unwrap_or(i32::MAX))
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        let response = run.send().await.map_err(|e| sdk_error("RunInstances", e))?;
        let instance = response
            .instances()
            .first()
            .map(to_cloud_instance)
            .ok_or_else(|| {
                CloudError::Unavailable("RunInstances answered without an instance".to_owned())
            })?;
        info!(instance_id = %instance.instance_id, image_id = %image.image_id, "launched");
        Ok(instance)
    }

    #[instrument(skip(self))]
    async fn start(&self, instance_id: &str) -> Result<(), CloudError> {
        self.client
            .start_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("StartInstances", e))?;
        Ok(())
    }

    #[instrument(skip(self))]
    async fn stop(&self, instance_id: &str) -> Result<(), CloudError> {
        self.client
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("StopInstances", e))?;
        Ok(())
    }

    #[instrument(skip(self))]
    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError> {
        match self
            .client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("TerminateInstances", e))
        {
            Ok(_) => Ok(()),
            Err(CloudError::NotFound(_)) => {
                debug!("already gone");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    #[instrument(skip(self))]
    async fn describe(&self, instance_id: &str) -> Result<Option<CloudInstance>, CloudError> {
        let response = match self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeInstances", e))
        {
            Ok(response) => response,
            Err(CloudError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(response
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .map(to_cloud_instance))
    }

    #[instrument(skip_all)]
    async fn list(&self, list: &ListFilter) -> Result<Vec<CloudInstance>, CloudError> {
        let mut filters = Vec::new();
        if list.managed_only {
            filters.push(filter(format!("tag:{TAG_MANAGED}"), ["true"]));
        }
        for (key, value) in &list.tags {
            filters.push(filter(format!("tag:{key}"), [value.as_str()]));
        }
        if !list.instance_ids.is_empty() {
            // A filter, not InstanceIds: unknown ids are skipped instead of failing the call,
            // and MaxResults stays allowed.
            filters.push(filter("instance-id", list.instance_ids.iter().cloned()));
        }
        if !list.include_terminated {
            filters.push(filter("instance-state-name", LIVE_STATES));
        }
        self.describe_all(filters).await
    }

    #[instrument(skip(self, set, remove), fields(set = set.len(), remove = remove.len()))]
    async fn update_tags(
        &self,
        instance_id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), CloudError> {
        validate_tags(set)?;
        for key in remove {
            validate_tag_key(key)?;
        }
        if !set.is_empty() {
            self.client
                .create_tags()
                .resources(instance_id)
                .set_tags(Some(tag_list(set)))
                .send()
                .await
                .map_err(|e| sdk_error("CreateTags", e))?;
        }
        let remove: Vec<Tag> = remove
            .iter()
            .filter(|k| !set.contains_key(*k))
            .map(|k| Tag::builder().key(k).build())
            .collect();
        if !remove.is_empty() {
            self.client
                .delete_tags()
                .resources(instance_id)
                .set_tags(Some(remove))
                .send()
                .await
                .map_err(|e| sdk_error("DeleteTags", e))?;
        }
        Ok(())
    }

    #[instrument(skip(self))]
    async fn find_image(&self, name_pattern: &str) -> Result<Option<CloudImage>, CloudError> {
        if name_pattern.trim().is_empty() {
            return Err(CloudError::InvalidRequest(
                "image name pattern is empty".to_owned(),
            ));
        }
        let mut images = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut call = self
                .client
                .describe_images()
                .filters(filter("name", [name_pattern]))
                .filters(filter("state", ["available"]))
                .set_next_token(token.take());
            if !self.settings.image_owners.is_empty() {
                call = call.set_owners(Some(self.settings.image_owners.clone()));
            }
            let response = call
                .send()
                .await
                .map_err(|e| sdk_error("DescribeImages", e))?;
            images.extend(response.images().iter().map(to_cloud_image));
            match response.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => break,
            }
        }
        debug!(matches = images.len(), "looked up images");
        Ok(newest_image(images))
    }
}

fn to_cloud_instance(i: &Instance) -> CloudInstance {
    CloudInstance {
        instance_id: i.instance_id().unwrap_or_default().to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| InstanceState::parse(n.as_str()))
            .unwrap_or(InstanceState::Unknown),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        image_id: i.image_id().unwrap_or_default().to_owned(),
        public_ip: i
            .public_ip_address()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        private_ip: i
            .private_ip_address()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        launch_time: i
            .launch_time()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())),
        tags: i
            .tags()
            .iter()
            .filter_map(|t| {
                Some((
                    t.key()?.to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
    }
}

fn to_cloud_image(i: &Image) -> CloudImage {
    CloudImage {
        image_id: i.image_id().unwrap_or_default().to_owned(),
        name: i.name().unwrap_or_default().to_owned(),
        description: i.description().unwrap_or_default().to_owned(),
        creation_date: i.creation_date().unwrap_or_default().to_owned(),
        root_device_name: i
            .root_device_name()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    }
}

/// Classifies an EC2 error by its code, then by HTTP status (legacy-features.md §3):
/// [`AUTH_ERROR_CODES`] → [`CloudError::Auth`], [`NOT_FOUND_ERROR_CODES`] →
/// [`CloudError::NotFound`], [`QUOTA_ERROR_CODES`] → [`CloudError::Quota`],
/// [`THROTTLE_ERROR_CODES`] → [`CloudError::Throttled`], [`UNAVAILABLE_ERROR_CODES`] →
/// [`CloudError::Unavailable`]; any other code (`InvalidParameterValue`, `InvalidAMIID.*`,
/// `InvalidGroup.NotFound`, `IncorrectInstanceState`, …) is a wrong request unless the status is
/// 5xx (unavailable), 401/403 (auth) or 429 (throttled).
pub fn classify_error_code(code: Option<&str>, status: Option<u16>, detail: String) -> CloudError {
    let status = status.unwrap_or(0);
    match code {
        Some(c) if AUTH_ERROR_CODES.contains(&c) => CloudError::Auth(detail),
        Some(c) if NOT_FOUND_ERROR_CODES.contains(&c) => CloudError::NotFound(detail),
        Some(c) if QUOTA_ERROR_CODES.contains(&c) => CloudError::Quota(detail),
        Some(c) if THROTTLE_ERROR_CODES.contains(&c) => CloudError::Throttled(detail),
        Some(c) if UNAVAILABLE_ERROR_CODES.contains(&c) => CloudError::Unavailable(detail),
        _ if status >= 500 => CloudError::Unavailable(detail),
        _ if status == 401 || status == 403 => CloudError::Auth(detail),
        _ if status == 429 => CloudError::Throttled(detail),
        Some(_) => CloudError::InvalidRequest(detail),
        // No code and a 4xx or no status: an answer we cannot read.
        None => CloudError::Unavailable(detail),
    }
}

/// Turns an SDK error into a [`CloudError`], naming the operation and EC2's code and message.
fn sdk_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(context) => {
            let code = context.err().code();
            let message = context.err().message().unwrap_or("no message");
            let status = context.raw().status().as_u16();
            let detail = format!(
                "{operation}: {} (HTTP {status}): {message}",
                code.unwrap_or("no error code")
            );
            classify_error_code(code, Some(status), detail)
        }
        SdkError::ConstructionFailure(_) => CloudError::InvalidRequest(format!(
            "{operation}: cannot build the request: {}",
            DisplayErrorContext(&err)
        )),
        // Timeouts, connection failures, unreadable answers.
        _ => CloudError::Unavailable(format!("{operation}: {}", DisplayErrorContext(&err))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_classes() {
        let c =
            |code: &str, status: u16| classify_error_code(Some(code), Some(status), code.into());
        assert!(matches!(
            c("UnauthorizedOperation", 403),
            CloudError::Auth(_)
        ));
        assert!(matches!(c("AuthFailure", 401), CloudError::Auth(_)));
        assert!(matches!(
            c("InvalidClientTokenId", 400),
            CloudError::Auth(_)
        ));
        assert!(matches!(
            c("SignatureDoesNotMatch", 403),
            CloudError::Auth(_)
        ));
        assert!(matches!(
            c("InvalidInstanceID.NotFound", 400),
            CloudError::NotFound(_)
        ));
        assert!(matches!(
            c("InstanceLimitExceeded", 400),
            CloudError::Quota(_)
        ));
        assert!(matches!(
            c("InsufficientInstanceCapacity", 500),
            CloudError::Quota(_)
        ));
        assert!(matches!(c("VcpuLimitExceeded", 400), CloudError::Quota(_)));
        assert!(matches!(
            c("RequestLimitExceeded", 503),
            CloudError::Throttled(_)
        ));
        assert!(matches!(
            c("InvalidAMIID.NotFound", 400),
            CloudError::InvalidRequest(_)
        ));
        assert!(matches!(
            c("InvalidAMIID.Malformed", 400),
            CloudError::InvalidRequest(_)
        ));
        assert!(matches!(
            c("InvalidGroup.NotFound", 400),
            CloudError::InvalidRequest(_)
        ));
        assert!(matches!(
            c("InvalidParameterValue", 400),
            CloudError::InvalidRequest(_)
        ));
        assert!(matches!(
            c("IncorrectInstanceState", 400),
            CloudError::InvalidRequest(_)
        ));
        assert!(matches!(
            c("InternalError", 500),
            CloudError::Unavailable(_)
        ));
        assert!(matches!(c("SomethingNew", 503), CloudError::Unavailable(_)));
        assert!(matches!(c("SomethingNew", 403), CloudError::Auth(_)));
        assert!(matches!(c("SomethingNew", 429), CloudError::Throttled(_)));
        assert!(matches!(
            classify_error_code(None, Some(404), "x".into()),
            CloudError::Unavailable(_)
        ));
    }

    #[test]
    fn settings_validation() {
        assert_eq!(AwsSettings::new("us-east-1").validate(), Ok(()));
        let bad = [
            AwsSettings::new(" "),
            AwsSettings {
                max_attempts: 0,
                ..AwsSettings::new("r")
            },
            AwsSettings {
                page_size: 4,
                ..AwsSettings::new("r")
            },
            AwsSettings {
                page_size: 1001,
                ..AwsSettings::new("r")
            },
            AwsSettings {
                initial_backoff: Duration::from_secs(30),
                ..AwsSettings::new("r")
            },
            AwsSettings {
                endpoint_url: Some("127.0.0.1:5000".into()),
                ..AwsSettings::new("r")
            },
            AwsSettings {
                credentials: AwsCredentials::Static {
                    access_key_id: String::new(),
                    secret_access_key: "s".into(),
                    session_token: None,
                },
                ..AwsSettings::new("r")
            },
        ];
        for settings in bad {
            assert!(
                matches!(settings.validate(), Err(CloudError::InvalidRequest(_))),
                "{settings:?} accepted"
            );
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let creds = AwsCredentials::Static {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("tok".into()),
        };
        let text = format!("{creds:?}");
        assert!(text.contains("AKIAEXAMPLE"), "{text}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(!text.contains("tok\""), "{text}");
    }
}
