//! The built web UI, served from a directory (`ui_dir`, default `web/dist`).
//!
//! - A file that exists is served with its media type. Files under `assets/` (Vite's
//!   content-hashed output) are cached for a year ([`IMMUTABLE_CACHE`]); everything else,
//!   `index.html` above all, is revalidated on every load ([`REVALIDATE_CACHE`]).
//! - Any other path without a file extension gets `index.html` (single-page-app routing).
//! - A missing file with an extension is a 404 problem.
//! - Without an `index.html` (the UI was not built) every UI path answers 503 with a page that
//!   says how to build it and links to the API docs.

use std::path::{Component, Path, PathBuf};

use axum::extract::Request;
use axum::response::{Html, IntoResponse, Response};
use http::{Method, StatusCode, header};

use crate::problem::Problem;

/// Cache-Control of content-hashed assets.
pub const IMMUTABLE_CACHE: &str = "public, max-age=31536000, immutable";
/// Cache-Control of everything else (index.html, favicon…).
pub const REVALIDATE_CACHE: &str = "no-cache";
/// The directory of content-hashed assets inside the UI directory.
pub const ASSETS_DIR: &str = "assets";

/// The media type of a file, by extension.
pub fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "ico" => "image/x-icon",
        "webp" => "image/webp",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// The file under `root` a URL path names, refusing anything that climbs out of it.
fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(url_path)
        .decode_utf8()
        .ok()?;
    let relative = Path::new(decoded.trim_start_matches('/'));
    let mut out = root.to_path_buf();
    for component in relative.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn not_built_page(root: &Path) -> Response {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ccm — UI not built</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;line-height:1.5}}\
         code{{background:#f2f2f2;padding:.1rem .3rem}}</style></head><body>\
         <h1>The ccm web UI is not built</h1>\
         <p>The gateway serves the UI from <code>{}</code>, which has no <code>index.html</code>.</p>\
         <p>Build it with <code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>, or point \
         <code>--ui-dir</code> (<code>CCM_GATEWAY__UI_DIR</code>) at a built copy.</p>\
         <p>The API works without it: see the <a href=\"/api/docs\">API documentation</a> and \
         <a href=\"/openapi.json\">/openapi.json</a>.</p></body></html>",
        html_escape(&root.display().to_string())
    );
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CACHE_CONTROL, REVALIDATE_CACHE)],
        Html(page),
    )
        .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn file_response(path: &Path, cache: &'static str, head: bool) -> Option<Response> {
    let bytes = tokio::fs::read(path).await.ok()?;
    let len = bytes.len();
    let body = if head { Vec::new() } else { bytes };
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type(path)),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response();
    if head && let Ok(v) = http::HeaderValue::from_str(&len.to_string()) {
        response.headers_mut().insert(header::CONTENT_LENGTH, v);
    }
    Some(response)
}

/// Serves `request` from the UI directory `root`.
pub async fn serve(root: &Path, request: Request) -> Response {
    let method = request.method().clone();
    let url_path = request.uri().path().to_owned();
    if method != Method::GET && method != Method::HEAD {
        let mut p = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("{method} is not allowed on {url_path}"),
        );
        p.allow = vec![Method::GET, Method::HEAD];
        return p.with_instance(&url_path).into_response();
    }
    let head = method == Method::HEAD;
    let index = root.join("index.html");
    if !tokio::fs::try_exists(&index).await.unwrap_or(false) {
        return not_built_page(root);
    }
    let Some(file) = resolve(root, &url_path) else {
        return Problem::new(StatusCode::NOT_FOUND, "not-found", "no such file")
            .with_instance(&url_path)
            .into_response();
    };
    if tokio::fs::metadata(&file)
        .await
        .map(|m| m.is_file())
        .unwrap_or(false)
    {
        let cache = if file.starts_with(root.join(ASSETS_DIR)) {
            IMMUTABLE_CACHE
        } else {
            REVALIDATE_CACHE
        };
        if let Some(r) = file_response(&file, cache, head).await {
            return r;
        }
    }
    let has_extension = Path::new(&url_path).extension().is_some();
    if has_extension {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("{url_path} is not part of the UI"),
        )
        .with_instance(&url_path)
        .into_response();
    }
    match file_response(&index, REVALIDATE_CACHE, head).await {
        Some(r) => r,
        None => not_built_page(root),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_the_root() {
        let root = Path::new("/srv/ui");
        assert_eq!(
            resolve(root, "/assets/a.js"),
            Some(PathBuf::from("/srv/ui/assets/a.js"))
        );
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(
            content_type(Path::new("x.js")),
            "text/javascript; charset=utf-8"
        );
    }
}
