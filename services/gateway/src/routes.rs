//! The route table: every `google.api.http` binding of the contracts (including
//! `additional_bindings`), parsed into path templates and matched against requests.
//!
//! Template syntax (the subset of `google/api/http.proto` the contracts use, and a bit more):
//! `/v1/workers/{worker_id}:drain`, `/v1/templates/{template.name}`,
//! `/v1/{name=workers/*}`, `/v1/{path=files/**}`, literal segments, `*` (one segment) and `**`
//! (the rest of the path), and a custom verb (`:drain`) after the last segment.

use std::collections::BTreeSet;

use ccm_proto::google::api::HttpRule;
use ccm_proto::google::api::http_rule::Pattern;
use http::Method;
use percent_encoding::percent_decode_str;
use prost_reflect::{DescriptorPool, MethodDescriptor};

use crate::error::GatewayError;

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A literal segment.
    Literal(String),
    /// `*`: exactly one segment.
    Single,
    /// `**`: the rest of the path (zero or more segments); only last.
    Multi,
}

/// A variable of a template: the field path it binds and the segments it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Field path, e.g. `["template", "name"]`.
    pub field_path: Vec<String>,
    /// Index of its first segment in [`PathTemplate::segments`].
    pub start: usize,
    /// Number of template segments it covers.
    pub len: usize,
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// The template as written in the contract.
    pub source: String,
    /// The segments, variables expanded (`{id}` is one [`Segment::Single`]).
    pub segments: Vec<Segment>,
    /// The variables, in order.
    pub variables: Vec<Variable>,
    /// The custom verb (`drain` for `…:drain`), if any.
    pub verb: Option<String>,
}

/// The path parameters bound by a match: (field path, value), percent-decoded.
pub type PathParams = Vec<(Vec<String>, String)>;

impl PathTemplate {
    /// Parses a template such as `/v1/workers/{worker_id}:drain`.
    pub fn parse(source: &str) -> Result<Self, GatewayError> {
        let bad = |why: &str| GatewayError::Contract(format!("path template {source:?}: {why}"));
        let rest = source
            .strip_prefix('/')
            .ok_or_else(|| bad("must start with '/'"))?;
        // The verb is a ':' after the last '/' and outside braces.
        let mut depth = 0usize;
        let mut verb_at = None;
        let mut last_slash = 0usize;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.checked_sub(1).ok_or_else(|| bad("unbalanced '}'"))?,
                '/' if depth == 0 => last_slash = i,
                ':' if depth == 0 && i >= last_slash => verb_at = Some(i),
                _ => {}
            }
        }
        if depth != 0 {
            return Err(bad("unbalanced '{'"));
        }
        let (body, verb) = match verb_at {
            Some(i) => (&rest[..i], Some(rest[i + 1..].to_owned())),
            None => (rest, None),
        };
        if verb.as_deref() == Some("") {
            return Err(bad("empty verb"));
        }
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let end = inner
                    .find('}')
                    .ok_or_else(|| bad("unterminated variable"))?;
                let var = &inner[..end];
                chars = &inner[end + 1..];
                let (field, pattern) = match var.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (var, "*"),
                };
                if field.is_empty() {
                    return Err(bad("variable without a field"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(match part {
                        "*" => Segment::Single,
                        "**" => Segment::Multi,
                        "" => return Err(bad("empty segment in variable")),
                        lit => Segment::Literal(lit.to_owned()),
                    });
                }
                variables.push(Variable {
                    field_path: field.split('.').map(str::to_owned).collect(),
                    start,
                    len: segments.len() - start,
                });
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                chars = &chars[end..];
                if part.contains(['{', '}', '=']) {
                    return Err(bad("a variable must be a whole segment"));
                }
                match part {
                    "" => {}
                    "*" => segments.push(Segment::Single),
                    "**" => segments.push(Segment::Multi),
                    lit => segments.push(Segment::Literal(lit.to_owned())),
                }
            }
            if let Some(after) = chars.strip_prefix('/') {
                chars = after;
            } else if !chars.is_empty() && !chars.starts_with('{') {
                return Err(bad("a variable must be a whole segment"));
            }
        }
        if let Some(pos) = segments.iter().position(|s| *s == Segment::Multi)
            && pos + 1 != segments.len()
        {
            return Err(bad("'**' must be the last segment"));
        }
        Ok(Self {
            source: source.to_owned(),
            segments,
            variables,
            verb,
        })
    }

    /// Matches a request path (as received, percent-encoded), returning the bound variables.
    pub fn matches(&self, path: &str) -> Option<PathParams> {
        let rest = path.strip_prefix('/')?;
        let body = match &self.verb {
            Some(verb) => rest.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let mut bound: Vec<Option<(usize, usize)>> = vec![None; self.segments.len()];
        let mut i = 0usize;
        for (k, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Literal(lit) => {
                    if parts.get(i) != Some(&lit.as_str()) {
                        return None;
                    }
                    bound[k] = Some((i, i + 1));
                    i += 1;
                }
                Segment::Single => {
                    let part = parts.get(i)?;
                    if part.is_empty() {
                        return None;
                    }
                    bound[k] = Some((i, i + 1));
                    i += 1;
                }
                Segment::Multi => {
                    bound[k] = Some((i, parts.len()));
                    i = parts.len();
                }
            }
        }
        if i != parts.len() {
            return None;
        }
        let mut params = Vec::with_capacity(self.variables.len());
        for var in &self.variables {
            let first = bound.get(var.start).copied().flatten()?;
            let last = bound.get(var.start + var.len - 1).copied().flatten()?;
            let (from, to) = (first.0, last.1);
            let value = if to - from == 1 {
                // A single segment: fully decoded (a '/' encoded as %2F stays a '/').
                percent_decode_str(parts[from])
                    .decode_utf8()
                    .ok()?
                    .into_owned()
            } else {
                // Several segments: decoded segment by segment, joined by '/'.
                let mut decoded = Vec::new();
                for p in &parts[from..to] {
                    decoded.push(percent_decode_str(p).decode_utf8().ok()?.into_owned());
                }
                decoded.join("/")
            };
            params.push((var.field_path.clone(), value));
        }
        Some(params)
    }

    /// Number of literal segments (more is more specific).
    fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// The template in OpenAPI form: `/v1/workers/{worker_id}:drain`, each variable as
    /// `{field.path}`.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut k = 0usize;
        while k < self.segments.len() {
            out.push('/');
            if let Some(var) = self.variables.iter().find(|v| v.start == k) {
                out.push('{');
                out.push_str(&var.field_path.join("."));
                out.push('}');
                k += var.len;
                continue;
            }
            match &self.segments[k] {
                Segment::Literal(l) => out.push_str(l),
                Segment::Single => out.push('*'),
                Segment::Multi => out.push_str("**"),
            }
            k += 1;
        }
        if out.is_empty() {
            out.push('/');
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }
}

/// One HTTP binding of one RPC.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path template.
    pub template: PathTemplate,
    /// The RPC.
    pub rpc: MethodDescriptor,
    /// The `body` of the rule: `""` (no body), `"*"` (the whole request) or a field name.
    pub body: String,
    /// The `response_body` of the rule: `""` (the whole response) or a field name.
    pub response_body: String,
    /// The process serving the RPC (`(ccm.v1.service_info).served_by`).
    pub served_by: String,
}

impl Route {
    /// A label for metrics and logs: `GET /v1/workers/{worker_id}`.
    pub fn label(&self) -> String {
        format!("{} {}", self.method, self.template.source)
    }

    /// True for server-streaming RPCs (relayed as Server-Sent Events).
    pub fn is_streaming(&self) -> bool {
        self.rpc.is_server_streaming()
    }
}

/// What the router found for a request.
#[derive(Debug)]
pub enum RouteMatch<'a> {
    /// A route and its path parameters.
    Found(&'a Route, PathParams),
    /// The path exists, but not for this method; the allowed methods.
    MethodNotAllowed(Vec<Method>),
    /// No route has this path.
    NotFound,
}

/// Every HTTP route of the public contracts.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

fn binding(rule: &HttpRule) -> Result<Option<(Method, String)>, GatewayError> {
    Ok(match &rule.pattern {
        None => None,
        Some(Pattern::Get(p)) => Some((Method::GET, p.clone())),
        Some(Pattern::Put(p)) => Some((Method::PUT, p.clone())),
        Some(Pattern::Post(p)) => Some((Method::POST, p.clone())),
        Some(Pattern::Delete(p)) => Some((Method::DELETE, p.clone())),
        Some(Pattern::Patch(p)) => Some((Method::PATCH, p.clone())),
        Some(Pattern::Custom(c)) => Some((
            Method::from_bytes(c.kind.as_bytes())
                .map_err(|e| GatewayError::Contract(format!("custom method {:?}: {e}", c.kind)))?,
            c.path.clone(),
        )),
    })
}

impl RouteTable {
    /// Builds the table from every public `ccm.v1` RPC with a `google.api.http` rule.
    pub fn from_descriptors(pool: &DescriptorPool) -> Result<Self, GatewayError> {
        let mut routes = Vec::new();
        for service in pool
            .services()
            .filter(|s| s.package_name() == ccm_proto::PACKAGE)
        {
            let info = ccm_proto::service_info(pool, service.full_name());
            if info.as_ref().map(|i| i.visibility())
                == Some(ccm_proto::v1::ServiceVisibility::Internal)
            {
                continue;
            }
            let served_by = info.map(|i| i.served_by).unwrap_or_default();
            for rpc in service.methods() {
                let Some(rule) = ccm_proto::http_rule_in(pool, rpc.full_name()) else {
                    continue;
                };
                let mut rules = vec![rule.clone()];
                rules.extend(rule.additional_bindings.iter().cloned());
                for r in rules {
                    let Some((method, path)) = binding(&r)? else {
                        continue;
                    };
                    // Additional bindings inherit nothing; an empty body means "no body".
                    routes.push(Route {
                        method,
                        template: PathTemplate::parse(&path)?,
                        rpc: rpc.clone(),
                        body: r.body.clone(),
                        response_body: r.response_body.clone(),
                        served_by: served_by.clone(),
                    });
                }
            }
        }
        // Most specific first: templates with a verb, then more literal segments.
        routes.sort_by_key(|r| {
            (
                r.template.verb.is_none(),
                std::cmp::Reverse(r.template.literal_count()),
            )
        });
        Ok(Self { routes })
    }

    /// Every route, most specific first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Finds the route of `method` and `path`.
    pub fn find(&self, method: &Method, path: &str) -> RouteMatch<'_> {
        let mut allowed = BTreeSet::new();
        // A path that ends in a verb some template declares (`/v1/workers/w:drain`) is only
        // matched by verb templates: `w:drain` is never a plain `{worker_id}`.
        let verb_path = self
            .routes
            .iter()
            .any(|r| r.template.verb.is_some() && r.template.matches(path).is_some());
        for route in &self.routes {
            if verb_path && route.template.verb.is_none() {
                continue;
            }
            if let Some(params) = route.template.matches(path) {
                if route.method == *method {
                    return RouteMatch::Found(route, params);
                }
                allowed.insert(route.method.to_string());
            }
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            RouteMatch::MethodNotAllowed(
                allowed
                    .into_iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> PathTemplate {
        PathTemplate::parse(s).unwrap()
    }

    fn params(p: PathParams) -> Vec<(String, String)> {
        p.into_iter().map(|(f, v)| (f.join("."), v)).collect()
    }

    #[test]
    fn simple_variable_and_verb() {
        let tpl = t("/v1/workers/{worker_id}:drain");
        assert_eq!(tpl.verb.as_deref(), Some("drain"));
        assert_eq!(
            params(tpl.matches("/v1/workers/w-1:drain").unwrap()),
            vec![("worker_id".into(), "w-1".into())]
        );
        assert!(tpl.matches("/v1/workers/w-1").is_none());
        assert!(tpl.matches("/v1/workers/w-1:stop").is_none());
        assert!(tpl.matches("/v1/workers/:drain").is_none());
        assert_eq!(tpl.openapi_path(), "/v1/workers/{worker_id}:drain");
    }

    #[test]
    fn verb_on_a_literal_and_nested_field() {
        let tpl = t("/v1/definitions:validate");
        assert!(tpl.matches("/v1/definitions:validate").unwrap().is_empty());
        assert!(tpl.matches("/v1/definitions").is_none());
        let tpl = t("/v1/templates/{template.name}");
        assert_eq!(
            params(tpl.matches("/v1/templates/small%20one").unwrap()),
            vec![("template.name".into(), "small one".into())]
        );
    }

    #[test]
    fn patterns_with_wildcards() {
        let tpl = t("/v1/{name=workers/*}");
        assert_eq!(
            params(tpl.matches("/v1/workers/abc").unwrap()),
            vec![("name".into(), "workers/abc".into())]
        );
        assert!(tpl.matches("/v1/templates/abc").is_none());
        assert!(tpl.matches("/v1/workers/abc/def").is_none());
        let tpl = t("/v1/{path=files/**}:get");
        assert_eq!(
            params(tpl.matches("/v1/files/a/b%2Fc/d:get").unwrap()),
            vec![("path".into(), "files/a/b/c/d".into())]
        );
        assert_eq!(
            params(tpl.matches("/v1/files:get").unwrap()),
            vec![("path".into(), "files".into())]
        );
        let tpl = t("/v1/*/x/{id}");
        assert!(tpl.matches("/v1/any/x/7").is_some());
        assert!(tpl.matches("/v1//x/7").is_none());
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "v1/x",
            "/v1/{id",
            "/v1/id}",
            "/v1/{=x}",
            "/v1/{a=**}/b",
            "/v1/x:",
            "/v1/a{id}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn the_contract_table_routes_every_rule() {
        let table = RouteTable::from_descriptors(ccm_proto::descriptor_pool()).unwrap();
        let rules = ccm_proto::all_http_rules();
        let bindings: usize = rules
            .iter()
            .map(|(_, r)| 1 + r.additional_bindings.len())
            .sum();
        assert_eq!(table.routes().len(), bindings);
        match table.find(&Method::POST, "/v1/workers/abc:drain") {
            RouteMatch::Found(route, p) => {
                assert_eq!(route.rpc.name(), "DrainWorker");
                assert_eq!(params(p), vec![("worker_id".into(), "abc".into())]);
            }
            other => panic!("{other:?}"),
        }
        match table.find(&Method::POST, "/v1/workers:import") {
            RouteMatch::Found(route, _) => assert_eq!(route.rpc.name(), "ImportWorkers"),
            other => panic!("{other:?}"),
        }
        match table.find(&Method::GET, "/v1/workers/abc:drain") {
            RouteMatch::MethodNotAllowed(m) => assert_eq!(m, vec![Method::POST]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            table.find(&Method::GET, "/v1/nothing"),
            RouteMatch::NotFound
        ));
    }
}
