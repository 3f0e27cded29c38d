//! Reading an imported CML lab (the topology YAML that `POST /api/v0/import` receives).
//!
//! Only what the simulator needs is read: `lab.{title,description,notes}`,
//! `nodes[].{id,label,node_definition,cpus,ram,tags}` and `links[].{n1,n2}`. The YAML itself is
//! kept verbatim (download returns it unchanged).

use std::collections::HashSet;

use serde_yaml_ng::{Mapping, Value};

/// One node of an imported lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyNode {
    /// `id` (e.g. `n0`).
    pub id: String,
    /// `label`.
    pub label: String,
    /// `node_definition`.
    pub node_definition: String,
    /// `cpus` (None = the node definition's default).
    pub cpus: Option<u32>,
    /// `ram` in MiB (None = the node definition's default).
    pub ram_mib: Option<u64>,
    /// `tags`, e.g. `serial:5041`.
    pub tags: Vec<String>,
}

/// What the simulator reads from a lab YAML.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// `lab.title`.
    pub title: Option<String>,
    /// `lab.description`.
    pub description: String,
    /// `lab.notes`.
    pub notes: String,
    /// `nodes`.
    pub nodes: Vec<TopologyNode>,
    /// Number of `links`.
    pub link_count: usize,
}

fn text(map: &Mapping, key: &str) -> Result<Option<String>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

fn count<T: TryFrom<u64>>(map: &Mapping, key: &str, ctx: &str) -> Result<Option<T>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| T::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| format!("{ctx}: `{key}` must be a non-negative integer")),
        Some(_) => Err(format!("{ctx}: `{key}` must be an integer")),
    }
}

/// Parses and checks a lab. Errors are CML-style descriptions (the import answers 400).
pub fn parse(yaml: &str) -> Result<Topology, String> {
    let doc: Value =
        serde_yaml_ng::from_str(yaml).map_err(|e| format!("the lab is not valid YAML: {e}"))?;
    let Value::Mapping(root) = doc else {
        return Err("the lab must be a YAML mapping with `lab`, `nodes` and `links`".into());
    };
    let mut topology = Topology::default();
    match root.get("lab") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(lab)) => {
            topology.title = text(lab, "title").map_err(|e| format!("lab: {e}"))?;
            topology.description = text(lab, "description")
                .map_err(|e| format!("lab: {e}"))?
                .unwrap_or_default();
            topology.notes = text(lab, "notes")
                .map_err(|e| format!("lab: {e}"))?
                .unwrap_or_default();
        }
        Some(_) => return Err("`lab` must be a mapping".into()),
    }
    let nodes = match root.get("nodes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(nodes)) => nodes.clone(),
        Some(_) => return Err("`nodes` must be a list".into()),
    };
    let mut ids = HashSet::new();
    for (index, node) in nodes.iter().enumerate() {
        let Value::Mapping(node) = node else {
            return Err(format!("nodes[{index}] must be a mapping"));
        };
        let ctx = format!("nodes[{index}]");
        let id = text(node, "id")
            .map_err(|e| format!("{ctx}: {e}"))?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{ctx}: `id` is required"))?;
        if !ids.insert(id.clone()) {
            return Err(format!("{ctx}: duplicate node id {id:?}"));
        }
        let node_definition = text(node, "node_definition")
            .map_err(|e| format!("{ctx}: {e}"))?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{ctx}: `node_definition` is required"))?;
        let label = text(node, "label")
            .map_err(|e| format!("{ctx}: {e}"))?
            .unwrap_or_else(|| id.clone());
        let tags = match node.get("tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(tags)) => tags
                .iter()
                .map(|t| match t {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(format!("{ctx}: `tags` must be strings")),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(format!("{ctx}: `tags` must be a list")),
        };
        topology.nodes.push(TopologyNode {
            cpus: count(node, "cpus", &ctx)?,
            ram_mib: count(node, "ram", &ctx)?,
            id,
            label,
            node_definition,
            tags,
        });
    }
    match root.get("links") {
        None | Some(Value::Null) => {}
        Some(Value::Sequence(links)) => {
            for (index, link) in links.iter().enumerate() {
                let Value::Mapping(link) = link else {
                    return Err(format!("links[{index}] must be a mapping"));
                };
                for end in ["n1", "n2"] {
                    let node = text(link, end).map_err(|e| format!("links[{index}]: {e}"))?;
                    match node {
                        Some(node) if ids.contains(&node) => {}
                        Some(node) => {
                            return Err(format!("links[{index}]: unknown node {node:?}"));
                        }
                        None => return Err(format!("links[{index}]: `{end}` is required")),
                    }
                }
            }
            topology.link_count = links.len();
        }
        Some(_) => return Err("`links` must be a list".into()),
    }
    Ok(topology)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
lab:
  title: Two nodes
  description: d
  notes: n
  version: 0.3.0
nodes:
  - id: n0
    label: r1
    node_definition: iosv
    cpus: 2
    ram: 1024
    tags: ["serial:5041"]
  - id: n1
    node_definition: alpine
    cpus: null
    ram: null
links:
  - id: l0
    n1: n0
    n2: n1
"#;

    #[test]
    fn parses_nodes_links_and_lab() {
        let t = parse(LAB).unwrap();
        assert_eq!(t.title.as_deref(), Some("Two nodes"));
        assert_eq!(t.description, "d");
        assert_eq!(t.link_count, 1);
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[0].cpus, Some(2));
        assert_eq!(t.nodes[0].ram_mib, Some(1024));
        assert_eq!(t.nodes[0].tags, vec!["serial:5041".to_string()]);
        assert_eq!(t.nodes[1].label, "n1");
        assert_eq!(t.nodes[1].cpus, None);
    }

    #[test]
    fn rejects_what_is_not_a_lab() {
        for (bad, needle) in [
            ("{{{ not yaml", "not valid YAML"),
            ("just a string", "mapping"),
            ("nodes: 3", "`nodes` must be a list"),
            ("nodes: [{id: n0}]", "node_definition"),
            (
                "nodes: [{id: n0, node_definition: a}, {id: n0, node_definition: a}]",
                "duplicate",
            ),
            (
                "nodes: [{id: n0, node_definition: a}]\nlinks: [{n1: n0, n2: n9}]",
                "unknown node",
            ),
            (
                "nodes: [{id: n0, node_definition: a, cpus: -1}]",
                "non-negative",
            ),
            ("lab: [1]", "`lab` must be a mapping"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }
}
