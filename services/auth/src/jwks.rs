//! The issuer's signing keys: fetched over HTTP (OIDC discovery → `jwks_uri`, or a configured
//! URL), cached, refreshed when stale or when a token names an unknown `kid` — at most once per
//! [`AuthConfig::min_jwks_refresh_interval`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use jsonwebtoken::DecodingKey;
use serde_json::Value;

use crate::config::AuthConfig;
use crate::error::AuthError;

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
    /// When a fetch was last attempted (successful or not).
    attempted_at: Option<Instant>,
    /// Why the last attempt failed, if it did.
    last_error: Option<String>,
    /// The `jwks_uri` found by discovery.
    discovered_uri: Option<String>,
}

/// Cached JWKS of one issuer.
pub(crate) struct JwksCache {
    http: reqwest::Client,
    config: AuthConfig,
    state: RwLock<KeySet>,
    /// Serialises fetches, so concurrent requests with the same unknown `kid` cause one fetch.
    refresh: tokio::sync::Mutex<()>,
}

impl JwksCache {
    pub(crate) fn new(http: reqwest::Client, config: AuthConfig) -> Self {
        Self {
            http,
            config,
            state: RwLock::new(KeySet::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// The key `kid`, if cached (and, when `fresh_only`, not older than the max age).
    fn cached(&self, kid: &str, fresh_only: bool) -> Option<Arc<DecodingKey>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let fresh = state
            .fetched_at
            .is_some_and(|t| t.elapsed() < self.config.jwks_max_age);
        if fresh_only && !fresh {
            return None;
        }
        state.keys.get(kid).cloned()
    }

    /// The verification key named `kid`.
    pub(crate) async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        if let Some(key) = self.cached(kid, true) {
            return Ok(key);
        }
        let _guard = self.refresh.lock().await;
        // Another request may have refreshed while this one waited.
        if let Some(key) = self.cached(kid, true) {
            return Ok(key);
        }
        let (recent_attempt, last_error) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            (
                state
                    .attempted_at
                    .is_some_and(|t| t.elapsed() < self.config.min_jwks_refresh_interval),
                state.last_error.clone(),
            )
        };
        if recent_attempt {
            if let Some(key) = self.cached(kid, false) {
                return Ok(key);
            }
            tracing::debug!(kid, "unknown kid; JWKS refresh rate-limited");
            return Err(match last_error {
                Some(err) => AuthError::IssuerUnavailable(err),
                None => AuthError::UnknownKey(kid.to_owned()),
            });
        }
        match self.refresh_locked().await {
            Ok(_) => self
                .cached(kid, false)
                .ok_or_else(|| AuthError::UnknownKey(kid.to_owned())),
            // A stale key still verifies while the issuer is briefly unreachable.
            Err(err) => self.cached(kid, false).ok_or(err),
        }
    }

    /// Fetches the JWKS now (for warming the cache at start).
    pub(crate) async fn refresh(&self) -> Result<usize, AuthError> {
        let _guard = self.refresh.lock().await;
        self.refresh_locked().await
    }

    /// Fetches and installs the JWKS; the caller holds `self.refresh`. Returns the key count.
    async fn refresh_locked(&self) -> Result<usize, AuthError> {
        let result = self.fetch().await;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.attempted_at = Some(Instant::now());
        match result {
            Ok((keys, discovered)) => {
                let count = keys.len();
                tracing::info!(keys = count, "fetched the issuer's JWKS");
                state.keys = keys;
                state.fetched_at = state.attempted_at;
                state.last_error = None;
                if discovered.is_some() {
                    state.discovered_uri = discovered;
                }
                Ok(count)
            }
            Err(err) => {
                tracing::warn!(error = %err, "fetching the issuer's JWKS failed");
                state.last_error = Some(err.to_string());
                Err(err)
            }
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, AuthError> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| AuthError::IssuerUnavailable(format!("GET {url}: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(AuthError::IssuerUnavailable(format!(
                "GET {url} answered {status}"
            )));
        }
        response
            .json()
            .await
            .map_err(|e| AuthError::IssuerUnavailable(format!("GET {url}: {e}")))
    }

    /// The JWKS URL: configured, already discovered, or discovered now (second value).
    async fn jwks_uri(&self) -> Result<(String, Option<String>), AuthError> {
        if let Some(url) = &self.config.jwks_url {
            return Ok((url.clone(), None));
        }
        let known = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .discovered_uri
            .clone();
        if let Some(url) = known {
            return Ok((url, None));
        }
        let url = self.config.discovery_url();
        let doc = self.get_json(&url).await?;
        // OIDC Discovery 1.0 §4.3: the document must name the issuer it was fetched for.
        let named = doc.get("issuer").and_then(Value::as_str);
        if named != Some(self.config.issuer.as_str()) {
            return Err(AuthError::IssuerUnavailable(format!(
                "discovery document {url} names issuer {named:?}, expected {:?}",
                self.config.issuer
            )));
        }
        let jwks = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::IssuerUnavailable(format!("{url} has no jwks_uri")))?;
        Ok((jwks.to_owned(), Some(jwks.to_owned())))
    }

    async fn fetch(
        &self,
    ) -> Result<(HashMap<String, Arc<DecodingKey>>, Option<String>), AuthError> {
        let (url, discovered) = self.jwks_uri().await?;
        let set = self.get_json(&url).await?;
        let keys = set
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| AuthError::IssuerUnavailable(format!("{url} is not a JWK set")))?;
        Ok((parse_signing_keys(keys), discovered))
    }
}

/// The RS256 signature keys of a JWK set, by `kid`. Keys for other uses (Keycloak also publishes
/// an `RSA-OAEP` encryption key), other types and keys without `kid` are skipped.
fn parse_signing_keys(keys: &[Value]) -> HashMap<String, Arc<DecodingKey>> {
    let str_of = |key: &Value, name: &str| key.get(name).and_then(Value::as_str).map(str::to_owned);
    keys.iter()
        .filter_map(|key| {
            let kid = str_of(key, "kid")?;
            let usable = str_of(key, "kty").as_deref() == Some("RSA")
                && str_of(key, "use").is_none_or(|u| u == "sig")
                && str_of(key, "alg").is_none_or(|a| a == "RS256");
            if !usable {
                return None;
            }
            let (n, e) = (str_of(key, "n")?, str_of(key, "e")?);
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(decoding) => Some((kid, Arc::new(decoding))),
                Err(err) => {
                    tracing::warn!(kid, error = %err, "skipping an unusable JWK");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_rs256_signature_keys_with_kid_are_kept() {
        // The public modulus and exponent of a throw-away 2048-bit RSA key.
        let n = concat!(
            "3MlsOmTOSjuBG35akPvskTWMar87ZW10GzHFgGeWsp1ELz9unOVlk8V33hfeXcwmm5DxbvHYN5-gXzeZihihiQWx",
            "jl_dlLCX3ThjBejKZ2b_V_uL_gDUTv45hi39Bd4vJmkNP5Mj5vU1o8roaBtv-29u2rbpIrVVT0XWrVZhMwgX-0Bf",
            "lGRz6HKqnQETXbHLz2f1gTpgngANFdAZ4x4uGgPRtbBpdCHD8o-x_NxlsVPSYgEfmgmot3WLU-DAqJn_y-qpyZJm",
            "o5DP__sGdyEvJESLZTAI_bHyge6azN2dwXZiQ0JZrPplcDyefma70nn9mUswy9pNKsePws7E_qmS2w"
        );
        let e = "AQAB";
        let keys = vec![
            json!({"kid": "sig", "kty": "RSA", "use": "sig", "alg": "RS256", "n": n, "e": e}),
            json!({"kid": "bare", "kty": "RSA", "n": n, "e": e}),
            json!({"kid": "enc", "kty": "RSA", "use": "enc", "alg": "RSA-OAEP", "n": n, "e": e}),
            json!({"kid": "ps", "kty": "RSA", "alg": "PS256", "n": n, "e": e}),
            json!({"kid": "ec", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
            json!({"kty": "RSA", "n": n, "e": e}),
            json!({"kid": "no-n", "kty": "RSA", "e": e}),
        ];
        let mut kids: Vec<_> = parse_signing_keys(&keys).into_keys().collect();
        kids.sort();
        assert_eq!(kids, vec!["bare".to_owned(), "sig".to_owned()]);
    }
}
