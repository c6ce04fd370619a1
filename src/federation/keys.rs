//! Server keys: ours as published, and other servers' as fetched, checked and cached.
//!
//! Owns `GET /_matrix/key/v2/server` (our self-signed key list) and the remote-key
//! lookup that X-Matrix verification uses: cache in memory and RocksDB, fetch from the
//! server itself when a key is unknown or expired (at most once per server per
//! `REFETCH_INTERVAL`, and a bounded number of fetches at once, so a flood of unknown
//! origins cannot turn courier into a request cannon; a request that finds a fetch of
//! its origin in flight waits for it). A fetched key list is trusted only if it names
//! the server we asked and is self-signed by one of its keys, and it replaces what was
//! cached: a key the server no longer lists stops authenticating at once.
//! It never accepts `old_verify_keys` for requests (the spec allows them for events
//! only).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;

use crate::federation::client::FederationClient;
use crate::ids::ServerName;
use crate::signing::{self, SigningKey, canonical::NumberMode};
use crate::store::keys::CachedKey;
use crate::store::{Store, now_ms};

/// The spec's cap: a key is never trusted beyond fetch time + 7 days.
const MAX_KEY_LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;
/// The smallest gap between two fetches of one server's keys.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long one key fetch may take.
const KEY_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Key fetches running at once, over all servers.
const MAX_CONCURRENT_FETCHES: usize = 32;

/// Builds our `/_matrix/key/v2/server` response, self-signed.
pub fn our_server_keys(server_name: &str, key: &SigningKey, valid_until_ts: u64) -> Value {
    let mut obj = Map::new();
    obj.insert("server_name".into(), json!(server_name));
    obj.insert(
        "verify_keys".into(),
        json!({ key.key_id(): {"key": key.public_key_base64()} }),
    );
    obj.insert("old_verify_keys".into(), json!({}));
    obj.insert("valid_until_ts".into(), json!(valid_until_ts));
    signing::sign_json(&mut obj, server_name, key, NumberMode::Strict)
        .expect("our key object is canonical");
    Value::Object(obj)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("no usable key {key_id} for {server}")]
    Unknown { server: String, key_id: String },
    #[error("fetching keys of {server} failed: {detail}")]
    Fetch { server: String, detail: String },
    #[error("key list of {server} refused: {detail}")]
    Invalid { server: String, detail: String },
    #[error("store: {0}")]
    Store(String),
}

/// Remote verify keys, looked up through memory, RocksDB, then the network.
pub struct RemoteKeys {
    store: Store,
    client: Arc<FederationClient>,
    memory: Mutex<HashMap<(String, String), CachedKey>>,
    /// Per server: when its keys were last fetched and whether that worked, behind
    /// a lock held for the fetch, so a request that arrives while one is in flight
    /// waits for its keys.
    last_fetch: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<LastFetch>>>>>,
    fetches: Semaphore,
}

impl RemoteKeys {
    pub fn new(store: Store, client: Arc<FederationClient>) -> Self {
        RemoteKeys {
            store,
            client,
            memory: Mutex::default(),
            last_fetch: Mutex::default(),
            fetches: Semaphore::new(MAX_CONCURRENT_FETCHES),
        }
    }

    /// The verify key `key_id` of `server`, valid now.
    pub async fn get(&self, server: &ServerName, key_id: &str) -> Result<VerifyingKey, KeyError> {
        let now = now_ms();
        if let Some(k) = self.cached(server.as_str(), key_id)?
            && k.valid_until_ts >= now
        {
            return parse(server, key_id, &k.key);
        }
        self.fetch(server).await?;
        match self.cached(server.as_str(), key_id)? {
            Some(k) if k.valid_until_ts >= now => parse(server, key_id, &k.key),
            _ => Err(KeyError::Unknown {
                server: server.to_string(),
                key_id: key_id.to_owned(),
            }),
        }
    }

    /// Whether `server` still lists `key_id` in its `verify_keys`, as its key server
    /// answered just now (or within `REFETCH_INTERVAL`). An error means it cannot be
    /// told: the key server did not answer, or not with a valid key list.
    pub async fn still_published(
        &self,
        server: &ServerName,
        key_id: &str,
    ) -> Result<bool, KeyError> {
        self.fetch(server).await?;
        Ok(self
            .cached(server.as_str(), key_id)?
            .is_some_and(|k| k.valid_until_ts >= now_ms()))
    }

    fn cached(&self, server: &str, key_id: &str) -> Result<Option<CachedKey>, KeyError> {
        let mk = (server.to_owned(), key_id.to_owned());
        if let Some(k) = self.memory.lock().expect("keys").get(&mk) {
            return Ok(Some(k.clone()));
        }
        let found = self
            .store
            .server_key(server, key_id)
            .map_err(|e| KeyError::Store(e.to_string()))?;
        if let Some(k) = &found {
            self.memory.lock().expect("keys").insert(mk, k.clone());
        }
        Ok(found)
    }

    /// Fetches and caches `server`'s keys, unless fetched within `REFETCH_INTERVAL`
    /// (then the outcome of that fetch stands).
    /// A caller that finds a fetch of `server` in flight waits for it (a bounded
    /// time) and uses what it found: the first requests of a new peer arrive
    /// together, and all of them deserve its keys.
    async fn fetch(&self, server: &ServerName) -> Result<(), KeyError> {
        let busy = |detail: &str| KeyError::Fetch {
            server: server.to_string(),
            detail: detail.into(),
        };
        let slot = {
            let mut last = self.last_fetch.lock().expect("last_fetch");
            if last.len() > 100_000 {
                last.retain(|_, slot| {
                    Arc::strong_count(slot) > 1
                        || slot.try_lock().map_or(true, |t| {
                            t.is_some_and(|t| t.at.elapsed() < REFETCH_INTERVAL)
                        })
                });
            }
            last.entry(server.to_string()).or_default().clone()
        };
        let mut last = tokio::time::timeout(KEY_FETCH_TIMEOUT, slot.lock())
            .await
            .map_err(|_| busy("a fetch of its keys is still in progress"))?;
        if let Some(t) = *last
            && t.at.elapsed() < REFETCH_INTERVAL
        {
            return if t.ok {
                Ok(())
            } else {
                Err(busy("its last fetch failed; trying again within 30 s"))
            };
        }
        // A slot next (waiting a bounded time: slots held by key servers that never
        // answer free up within KEY_FETCH_TIMEOUT); a fetch that never got one must
        // not count as a fetch.
        let _permit = tokio::time::timeout(KEY_FETCH_TIMEOUT, self.fetches.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| busy("too many key fetches in progress"))?;
        // Recorded as failed first: a fetch cut off midway counts as one.
        let at = Instant::now();
        *last = Some(LastFetch { at, ok: false });
        self.fetch_now(server).await?;
        *last = Some(LastFetch { at, ok: true });
        Ok(())
    }

    /// One fetch of `server`'s keys, cached if valid.
    async fn fetch_now(&self, server: &ServerName) -> Result<(), KeyError> {
        let fail = |detail: String| KeyError::Fetch {
            server: server.to_string(),
            detail,
        };
        // A key server that never answers must not hold a slot for long.
        let reply = tokio::time::timeout(
            KEY_FETCH_TIMEOUT,
            self.client.get_unsigned(server, "/_matrix/key/v2/server"),
        )
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
        if !reply.status.is_success() {
            return Err(fail(format!("HTTP {}", reply.status)));
        }
        let body: Value = serde_json::from_slice(&reply.body).map_err(|e| fail(e.to_string()))?;
        let now = now_ms();
        let keys = check_key_response(server.as_str(), &body, now)?;
        tracing::info!(server = %server, keys = keys.len(), "fetched server keys");
        self.store
            .put_server_keys(server.as_str(), &keys)
            .await
            .map_err(|e| KeyError::Store(e.to_string()))?;
        let mut mem = self.memory.lock().expect("keys");
        // The fresh list replaces what was cached, as in the store.
        mem.retain(|(s, _), _| s != server.as_str());
        for (id, k) in keys {
            mem.insert((server.to_string(), id), k);
        }
        Ok(())
    }
}

/// One server's last key fetch.
#[derive(Debug, Clone, Copy)]
struct LastFetch {
    at: Instant,
    ok: bool,
}

fn parse(server: &ServerName, key_id: &str, b64: &str) -> Result<VerifyingKey, KeyError> {
    signing::parse_verify_key(b64).map_err(|e| KeyError::Invalid {
        server: server.to_string(),
        detail: format!("{key_id}: {e}"),
    })
}

/// Checks a `/_matrix/key/v2/server` response for `server` and returns its
/// `verify_keys`, with validity capped at `now` + 7 days.
pub fn check_key_response(
    server: &str,
    body: &Value,
    now: u64,
) -> Result<Vec<(String, CachedKey)>, KeyError> {
    let invalid = |detail: &str| KeyError::Invalid {
        server: server.to_owned(),
        detail: detail.to_owned(),
    };
    let obj = body.as_object().ok_or_else(|| invalid("not an object"))?;
    if obj.get("server_name").and_then(Value::as_str) != Some(server) {
        return Err(invalid("server_name is not the server asked"));
    }
    let valid_until = obj
        .get("valid_until_ts")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid("valid_until_ts missing"))?;
    if valid_until < now {
        return Err(invalid("valid_until_ts is in the past"));
    }
    let verify_keys = obj
        .get("verify_keys")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("verify_keys missing"))?;
    let mut keys = Vec::new();
    for (id, v) in verify_keys {
        if !id.starts_with("ed25519:") {
            continue;
        }
        let b64 = v
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("verify key without `key`"))?;
        signing::parse_verify_key(b64).map_err(|e| invalid(&e.to_string()))?;
        keys.push((
            id.clone(),
            CachedKey {
                key: b64.to_owned(),
                valid_until_ts: valid_until.min(now + MAX_KEY_LIFETIME_MS),
                fetched_ts: now,
            },
        ));
    }
    if keys.is_empty() {
        return Err(invalid("no ed25519 verify key"));
    }
    let lookup = |id: &str| {
        keys.iter()
            .find(|(k, _)| k == id)
            .and_then(|(_, c)| signing::parse_verify_key(&c.key).ok())
    };
    signing::verify_json(obj, server, lookup, NumberMode::Python)
        .map_err(|e| invalid(&format!("self-signature: {e}")))?;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_seed("k1", [7u8; 32]).unwrap()
    }

    #[test]
    fn our_keys_pass_our_own_check() {
        let v = our_server_keys("a.test", &key(), 2_000);
        let keys = check_key_response("a.test", &v, 1_000).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, "ed25519:k1");
        assert_eq!(keys[0].1.valid_until_ts, 2_000);
    }

    #[test]
    fn validity_is_capped_at_seven_days() {
        let far = 10 * MAX_KEY_LIFETIME_MS;
        let keys =
            check_key_response("a.test", &our_server_keys("a.test", &key(), far), 1).unwrap();
        assert_eq!(keys[0].1.valid_until_ts, 1 + MAX_KEY_LIFETIME_MS);
    }

    #[test]
    fn refuses_wrong_name_expiry_and_tampering() {
        let v = our_server_keys("a.test", &key(), 2_000);
        assert!(check_key_response("b.test", &v, 1_000).is_err());
        assert!(check_key_response("a.test", &v, 3_000).is_err());
        let mut t = v.clone();
        t["valid_until_ts"] = json!(2_001);
        assert!(check_key_response("a.test", &t, 1_000).is_err());
        let mut u = v.clone();
        u["signatures"] = json!({});
        assert!(check_key_response("a.test", &u, 1_000).is_err());
    }
}
