//! Reaching a worker's CML: the endpoint template and the client factory.
//!
//! A worker's CML base URL comes from [`EndpointTemplate`] (setting `cml_endpoint_template`,
//! default `https://{public_ip}`): the placeholders `{public_ip}`, `{private_ip}` and
//! `{instance_id}` are filled from the worker's EC2 facts. Dev mode and tests use
//! `http://127.0.0.1:PORT/{instance_id}` against one multi-host CML simulator.
//!
//! A [`CmlClientFactory`] (from `ccm-cml`) turns a base URL into a `CmlClient`: production
//! and tests wire `ccm_cml::http::HttpCmlClientFactory`.

use std::fmt;

pub use ccm_cml::http::CmlClientFactory;

use crate::error::ControllerError;

/// The placeholders an endpoint template may use.
pub const PLACEHOLDERS: [&str; 3] = ["{public_ip}", "{private_ip}", "{instance_id}"];

/// A parsed `cml_endpoint_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTemplate {
    template: String,
}

/// The facts a template is filled from.
#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointFacts<'a> {
    /// Public IPv4 (may be empty).
    pub public_ip: &'a str,
    /// Private IPv4 (may be empty).
    pub private_ip: &'a str,
    /// EC2 instance id (may be empty).
    pub instance_id: &'a str,
}

impl EndpointTemplate {
    /// Parses a template: an `http://` or `https://` URL whose only `{…}` are the
    /// [`PLACEHOLDERS`].
    pub fn parse(template: &str) -> Result<Self, ControllerError> {
        let bad = |why: String| {
            ControllerError::Config(format!("cml_endpoint_template {template:?}: {why}"))
        };
        if !(template.starts_with("http://") || template.starts_with("https://")) {
            return Err(bad("must start with http:// or https://".into()));
        }
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let tail = &rest[open..];
            let Some(close) = tail.find('}') else {
                return Err(bad("unterminated `{`".into()));
            };
            let name = &tail[..=close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(bad(format!(
                    "unknown placeholder {name}; use {}",
                    PLACEHOLDERS.join(", ")
                )));
            }
            rest = &tail[close + 1..];
        }
        Ok(EndpointTemplate {
            template: template.to_owned(),
        })
    }

    /// The URL for `facts`, or `None` when a placeholder the template uses is empty (the worker
    /// is not reachable yet).
    pub fn render(&self, facts: EndpointFacts<'_>) -> Option<String> {
        let mut out = self.template.clone();
        for (name, value) in [
            ("{public_ip}", facts.public_ip),
            ("{private_ip}", facts.private_ip),
            ("{instance_id}", facts.instance_id),
        ] {
            if out.contains(name) {
                if value.is_empty() {
                    return None;
                }
                out = out.replace(name, value);
            }
        }
        Some(out.trim_end_matches('/').to_owned())
    }
}

impl fmt::Display for EndpointTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_refuse_unknown_placeholders() {
        let t = EndpointTemplate::parse("http://127.0.0.1:9000/{instance_id}").unwrap();
        let facts = EndpointFacts {
            public_ip: "",
            private_ip: "10.0.0.1",
            instance_id: "i-0abc",
        };
        assert_eq!(
            t.render(facts).as_deref(),
            Some("http://127.0.0.1:9000/i-0abc")
        );
        let public = EndpointTemplate::parse("https://{public_ip}").unwrap();
        assert_eq!(public.render(facts), None, "no public IP yet");
        assert!(EndpointTemplate::parse("https://{host}").is_err());
        assert!(EndpointTemplate::parse("ftp://{public_ip}").is_err());
        assert!(EndpointTemplate::parse("https://{public_ip").is_err());
    }
}
