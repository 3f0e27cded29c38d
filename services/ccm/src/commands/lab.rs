//! `ccm lab validate|rewrite`: the domain's lab-file rules, offline.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use ccm_core::labyaml;

use crate::cli::LabCommand;
use crate::error::CliError;

/// Runs `ccm lab …`.
pub fn run(command: LabCommand) -> Result<(), CliError> {
    match command {
        LabCommand::Validate { file, ports } => {
            let yaml = read_input(&file)?;
            print!("{}", validate(&yaml, &ports)?);
            Ok(())
        }
        LabCommand::Rewrite {
            file,
            ports,
            output,
        } => {
            let yaml = read_input(&file)?;
            let allocated = parse_assignments(&ports)?;
            let names: Vec<&str> = allocated.keys().map(String::as_str).collect();
            let rewritten = labyaml::rewrite_ports(&yaml, &names, &allocated)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, rewritten).map_err(|source| CliError::Io { path, source })
                }
                None => {
                    print!("{rewritten}");
                    Ok(())
                }
            }
        }
    }
}

/// Checks `yaml` against the port names and describes what it found.
pub fn validate(yaml: &str, ports: &[String]) -> Result<String, CliError> {
    let names: Vec<&str> = ports.iter().map(String::as_str).collect();
    let summary = labyaml::validate_against_ports(yaml, &names)?;
    let mut out = format!(
        "ok: {} ({} nodes, {} placeholders for {} ports)\n",
        summary.title.as_deref().unwrap_or("untitled lab"),
        summary.node_count,
        summary.references.len(),
        names.len()
    );
    for r in &summary.references {
        out.push_str(&format!(
            "  {:<28} {:<20} → {}\n",
            r.location, r.placeholder, r.port_name
        ));
    }
    Ok(out)
}

/// Parses `NAME=PORT` assignments.
pub fn parse_assignments(ports: &[String]) -> Result<BTreeMap<String, u16>, CliError> {
    let mut out = BTreeMap::new();
    for p in ports {
        let (name, port) = p
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--port {p:?}: expected NAME=PORT")))?;
        let port: u16 = port.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            CliError::Usage(format!("--port {p:?}: {port:?} is not a port (1-65535)"))
        })?;
        if out.insert(name.to_string(), port).is_some() {
            return Err(CliError::Usage(format!("--port {name} given twice")));
        }
    }
    Ok(out)
}

fn read_input(file: &Path) -> Result<String, CliError> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|source| CliError::Io {
                path: PathBuf::from("<stdin>"),
                source,
            })?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|source| CliError::Io {
            path: file.to_path_buf(),
            source,
        })
    }
}
