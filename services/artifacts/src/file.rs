//! `file:` URIs.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::io::AsyncReadExt;

use crate::{
    Artifact, ArtifactError, ArtifactFetcher, check_announced, invalid, push_limited, redact_uri,
};

/// Size of one read from a file.
const FILE_READ_CHUNK: usize = 64 * 1024;

/// Reads `file:///absolute/path` URIs from the local file system.
///
/// Accepted forms: `file:///abs/path` and `file://localhost/abs/path`, percent-encoded
/// (`%20` for a space). Refused as [`ArtifactError::InvalidUri`]: relative paths
/// (`file:x.yaml`, `file://x.yaml`), other hosts, any `.` or `..` segment (also
/// percent-encoded), a query or fragment, NUL bytes, and paths that are not regular files.
/// With a root directory, the resolved path (symlinks followed) must lie inside the resolved
/// root, otherwise [`ArtifactError::Denied`].
#[derive(Debug, Clone)]
pub struct FileFetcher {
    root: Option<PathBuf>,
    max_bytes: u64,
}

impl FileFetcher {
    /// A fetcher confined to `root` (when given) that reads at most `max_bytes`.
    pub fn new(root: Option<PathBuf>, max_bytes: u64) -> FileFetcher {
        FileFetcher { root, max_bytes }
    }

    /// The local path a `file:` URI names, checked as described on [`FileFetcher`] (except
    /// the root check, which needs the file system).
    pub fn path_of(uri: &str) -> Result<PathBuf, ArtifactError> {
        let Some(rest) = strip_prefix_ignore_case(uri, "file://") else {
            return Err(invalid(
                uri,
                "a file URI must be file:///absolute/path (relative paths are not accepted)",
            ));
        };
        let encoded = if rest.starts_with('/') {
            rest
        } else if let Some(after) = strip_prefix_ignore_case(rest, "localhost/") {
            // Keep the slash.
            &rest[rest.len() - after.len() - 1..]
        } else {
            return Err(invalid(
                uri,
                "a file URI must be file:///absolute/path on this host (relative path or remote host)",
            ));
        };
        if encoded.contains(['?', '#']) {
            return Err(invalid(
                uri,
                "a file URI has no query or fragment (percent-encode ? and #)",
            ));
        }
        let decoded = percent_decode(encoded)
            .ok_or_else(|| invalid(uri, "bad percent-encoding or not UTF-8"))?;
        if decoded.contains('\0') {
            return Err(invalid(uri, "NUL byte in path"));
        }
        if decoded
            .split('/')
            .any(|segment| segment == ".." || segment == ".")
        {
            return Err(invalid(uri, "'.' and '..' path segments are not allowed"));
        }
        let path = PathBuf::from(decoded);
        // Belt and braces: after the checks above the path is absolute and normal.
        if !path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(invalid(uri, "not an absolute path"));
        }
        Ok(path)
    }

    async fn confine(&self, uri: &str, path: &Path) -> Result<PathBuf, ArtifactError> {
        let Some(root) = &self.root else {
            return Ok(path.to_path_buf());
        };
        let root = tokio::fs::canonicalize(root).await.map_err(|e| {
            ArtifactError::Config(format!(
                "artifact root directory {} cannot be resolved: {e}",
                root.display()
            ))
        })?;
        let resolved = tokio::fs::canonicalize(path)
            .await
            .map_err(|e| io_error(uri, &e))?;
        if resolved.starts_with(&root) {
            Ok(resolved)
        } else {
            Err(ArtifactError::Denied {
                uri: redact_uri(uri),
                detail: format!(
                    "path resolves outside the artifact root directory {}",
                    root.display()
                ),
            })
        }
    }
}

#[async_trait]
impl ArtifactFetcher for FileFetcher {
    async fn fetch(&self, uri: &str) -> Result<Artifact, ArtifactError> {
        let path = Self::path_of(uri)?;
        let path = self.confine(uri, &path).await?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(uri, &e))?;
        let metadata = file.metadata().await.map_err(|e| io_error(uri, &e))?;
        if !metadata.is_file() {
            return Err(invalid(uri, "not a regular file"));
        }
        check_announced(Some(metadata.len()), self.max_bytes, uri)?;
        // The file may grow between stat and read: enforce the limit while reading too.
        let capacity = usize::try_from(metadata.len()).unwrap_or(0);
        let mut bytes = Vec::with_capacity(capacity);
        let mut chunk = vec![0u8; FILE_READ_CHUNK];
        loop {
            let n = file.read(&mut chunk).await.map_err(|e| io_error(uri, &e))?;
            if n == 0 {
                break;
            }
            push_limited(&mut bytes, &chunk[..n], self.max_bytes, uri)?;
        }
        let last_modified = metadata.modified().ok().map(DateTime::<Utc>::from);
        Ok(Artifact::new(uri, Bytes::from(bytes), None, last_modified))
    }
}

fn io_error(uri: &str, err: &std::io::Error) -> ArtifactError {
    let uri = redact_uri(uri);
    let detail = err.to_string();
    match err.kind() {
        ErrorKind::NotFound => ArtifactError::NotFound { uri, detail },
        ErrorKind::PermissionDenied => ArtifactError::Denied { uri, detail },
        ErrorKind::IsADirectory | ErrorKind::NotADirectory | ErrorKind::InvalidFilename => {
            ArtifactError::InvalidUri {
                uri,
                reason: detail,
            }
        }
        _ => ArtifactError::Unavailable { uri, detail },
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
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
    fn accepted_forms() {
        assert_eq!(
            FileFetcher::path_of("file:///srv/labs/a.yaml").unwrap(),
            PathBuf::from("/srv/labs/a.yaml")
        );
        assert_eq!(
            FileFetcher::path_of("FILE://localhost/srv/a.yaml").unwrap(),
            PathBuf::from("/srv/a.yaml")
        );
        assert_eq!(
            FileFetcher::path_of("file:///srv/my%20lab.yaml").unwrap(),
            PathBuf::from("/srv/my lab.yaml")
        );
    }

    #[test]
    fn refused_forms() {
        for uri in [
            "file:relative.yaml",
            "file:./relative.yaml",
            "file://relative.yaml",
            "file://host.example/srv/a.yaml",
            "file:///srv/../etc/passwd",
            "file:///srv/%2e%2e/etc/passwd",
            "file:///srv/./a.yaml",
            "file:///srv/a.yaml?x=1",
            "file:///srv/a.yaml#f",
            "file:///srv/%zz",
            "file:///srv/%ff",
            "file:///srv/a%00b",
            "/srv/a.yaml",
        ] {
            let err = FileFetcher::path_of(uri).unwrap_err();
            assert!(
                matches!(err, ArtifactError::InvalidUri { .. }),
                "{uri}: {err:?}"
            );
        }
    }
}
