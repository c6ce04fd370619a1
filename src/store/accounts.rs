//! Local users, their devices and the devices' access tokens.
//!
//! Key layout:
//! - `users`:   `user_id` -> JSON [`UserRecord`]
//! - `devices`: `user_id \0 device_id` -> JSON [`DeviceRecord`]
//! - `tokens`:  `sha256(access_token)` -> `user_id \0 device_id`
//!
//! Tokens are stored hashed: a copy of the store does not let anyone sign in. Deleting
//! a device deletes its token and its inbox in the same batch. The owners of tokens
//! in use are kept in memory ([`TokenCache`]), forgotten at every change. This module never
//! decides who may do what: the admin API does.

use rand::RngExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Batch, Store, StoreError, cf, key, now_ms, prefix_end};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub created_ts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub created_ts: u64,
    /// Hex SHA-256 of the device's current access token.
    pub token_hash: String,
}

/// A device as listed by the admin API.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub created_ts: u64,
    /// Last `/sync` (ms), if the device ever synced.
    pub last_seen_ts: Option<u64>,
}

/// Hex SHA-256 of an access token.
pub fn hash_token(token: &str) -> String {
    hex(&token_digest(token))
}

fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Owners of the access tokens used lately, so authenticating a request is a hash
/// and a map lookup rather than a read of the tokens column family. Only tokens that
/// exist are kept (an unknown one is read each time: nobody can fill memory with
/// guesses), at most `TOKEN_CACHE_ENTRIES`, then it starts over.
///
/// Every change to the tokens column family calls [`TokenCache::changed`] after its
/// commit. A lookup that missed may fill in what it read only if no change completed
/// since it began (`generation`): a read from before a revocation never outlives it.
#[derive(Default)]
pub(crate) struct TokenCache {
    inner: std::sync::Mutex<TokenCacheInner>,
}

#[derive(Default)]
struct TokenCacheInner {
    generation: u64,
    owners: std::collections::HashMap<[u8; 32], (String, String)>,
}

const TOKEN_CACHE_ENTRIES: usize = 65_536;

impl TokenCache {
    /// The cached owner of `digest`, or the generation a fill must match.
    fn get(&self, digest: &[u8; 32]) -> Result<(String, String), u64> {
        let g = self.inner.lock().expect("token cache");
        g.owners.get(digest).cloned().ok_or(g.generation)
    }

    fn fill(&self, generation: u64, digest: [u8; 32], owner: &(String, String)) {
        let mut g = self.inner.lock().expect("token cache");
        if g.generation != generation {
            return;
        }
        if g.owners.len() >= TOKEN_CACHE_ENTRIES {
            g.owners.clear();
        }
        g.owners.insert(digest, owner.clone());
    }

    /// Forgets everything: a token was added, replaced or deleted.
    fn changed(&self) {
        let mut g = self.inner.lock().expect("token cache");
        g.generation += 1;
        g.owners.clear();
    }
}

/// A fresh random token: 256 bits, URL-safe.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    format!("cou_{}", base64_url(&bytes))
}

/// A fresh random device ID: 10 upper-case letters, like Synapse's.
pub fn new_device_id() -> String {
    let mut rng = rand::rng();
    (0..10)
        .map(|_| (b'A' + rng.random_range(0..26u8)) as char)
        .collect()
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn corrupt(cf: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        cf,
        detail: e.to_string(),
    }
}

impl Store {
    pub fn user_exists(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self.db().get_pinned_cf(self.cf(cf::USERS), user)?.is_some())
    }

    /// Creates `user`; false if it already existed.
    pub async fn add_user(&self, user: &str) -> Result<bool, StoreError> {
        if self.user_exists(user)? {
            return Ok(false);
        }
        let mut b = Batch::new();
        let rec = UserRecord {
            created_ts: now_ms(),
        };
        b.0.put_cf(
            self.cf(cf::USERS),
            user,
            serde_json::to_vec(&rec).expect("serializes"),
        );
        self.commit(b).await?;
        Ok(true)
    }

    fn device_record(&self, user: &str, device: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let k = key(&[user.as_bytes(), device.as_bytes()]);
        match self.db().get_pinned_cf(self.cf(cf::DEVICES), k)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| corrupt(cf::DEVICES, e)),
        }
    }

    pub fn device_exists(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let k = key(&[user.as_bytes(), device.as_bytes()]);
        Ok(self.db().get_pinned_cf(self.cf(cf::DEVICES), k)?.is_some())
    }

    /// Creates (or re-keys) a device, creating the user if needed. Returns the new
    /// access token; an existing device's previous token stops working.
    pub async fn add_device(&self, user: &str, device: &str) -> Result<String, StoreError> {
        let token = new_token();
        let token_hash = hash_token(&token);
        let mut b = Batch::new();
        if !self.user_exists(user)? {
            let rec = UserRecord {
                created_ts: now_ms(),
            };
            b.0.put_cf(
                self.cf(cf::USERS),
                user,
                serde_json::to_vec(&rec).expect("serializes"),
            );
        }
        let created_ts = match self.device_record(user, device)? {
            Some(old) => {
                b.0.delete_cf(self.cf(cf::TOKENS), old.token_hash.as_bytes());
                old.created_ts
            }
            None => now_ms(),
        };
        let rec = DeviceRecord {
            created_ts,
            token_hash: token_hash.clone(),
        };
        let dk = key(&[user.as_bytes(), device.as_bytes()]);
        b.0.put_cf(
            self.cf(cf::DEVICES),
            &dk,
            serde_json::to_vec(&rec).expect("serializes"),
        );
        b.0.put_cf(self.cf(cf::TOKENS), token_hash.as_bytes(), &dk);
        let committed = self.commit(b).await;
        self.tokens.changed();
        committed?;
        Ok(token)
    }

    /// Deletes a device, its token, its pending inbox and its txnIds. False if it did
    /// not exist. A device created again under the same ID is a new device: its
    /// requests are not retransmissions of the old one's (the spec scopes txnIds to a
    /// device), so the old markers go too, one point delete each (a range tombstone
    /// would slow every marker lookup until it is flushed).
    pub async fn delete_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        // Waits for requests that found this device to write their rows first.
        let _no_lookups = self.devices.write().await;
        let Some(rec) = self.device_record(user, device)? else {
            return Ok(false);
        };
        let mut b = Batch::new();
        let dk = key(&[user.as_bytes(), device.as_bytes()]);
        b.0.delete_cf(self.cf(cf::DEVICES), &dk);
        b.0.delete_cf(self.cf(cf::TOKENS), rec.token_hash.as_bytes());
        self.inbox_delete_all(&mut b, user, device);
        let txns = key(&[user.as_bytes(), device.as_bytes(), b""]);
        for item in self.scan(cf::CLIENT_TXNS, &txns) {
            let (k, _) = item?;
            b.0.delete_cf(self.cf(cf::CLIENT_TXNS), k);
        }
        let committed = self.commit(b).await;
        self.tokens.changed();
        committed?;
        Ok(true)
    }

    /// The device IDs of `user`, in order.
    pub fn device_ids(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let prefix = key(&[user.as_bytes(), b""]);
        let mut out = Vec::new();
        for item in self.scan(cf::DEVICES, &prefix) {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// The devices of `user`, for the admin API.
    pub fn list_devices(&self, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        let prefix = key(&[user.as_bytes(), b""]);
        let mut out = Vec::new();
        for item in self.scan(cf::DEVICES, &prefix) {
            let (k, v) = item?;
            let device_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let rec: DeviceRecord =
                serde_json::from_slice(&v).map_err(|e| corrupt(cf::DEVICES, e))?;
            let last_seen_ts = self.inbox_state(user, &device_id)?.last_sync_ts;
            out.push(DeviceInfo {
                device_id,
                created_ts: rec.created_ts,
                last_seen_ts,
            });
        }
        Ok(out)
    }

    /// Every `(user, device)` known, for housekeeping.
    pub fn all_devices(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for item in self.scan(cf::DEVICES, b"") {
            let (k, _) = item?;
            if let Some(i) = k.iter().position(|&b| b == 0) {
                out.push((
                    String::from_utf8_lossy(&k[..i]).into_owned(),
                    String::from_utf8_lossy(&k[i + 1..]).into_owned(),
                ));
            }
        }
        Ok(out)
    }

    /// Every device with its record, in key order, read lazily: housekeeping walks all
    /// devices without holding them in memory.
    pub fn device_records(
        &self,
    ) -> impl Iterator<Item = Result<(String, String, DeviceRecord), StoreError>> + '_ {
        self.scan(cf::DEVICES, b"").map(|item| {
            let (k, v) = item?;
            let i = k
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| corrupt(cf::DEVICES, "no separator"))?;
            let rec: DeviceRecord =
                serde_json::from_slice(&v).map_err(|e| corrupt(cf::DEVICES, e))?;
            Ok((
                String::from_utf8_lossy(&k[..i]).into_owned(),
                String::from_utf8_lossy(&k[i + 1..]).into_owned(),
                rec,
            ))
        })
    }

    /// Who owns `token`: `(user_id, device_id)`.
    pub fn token_owner(&self, token: &str) -> Result<Option<(String, String)>, StoreError> {
        let digest = token_digest(token);
        let generation = match self.tokens.get(&digest) {
            Ok(owner) => return Ok(Some(owner)),
            Err(generation) => generation,
        };
        let h = hex(&digest);
        let Some(v) = self.db().get_pinned_cf(self.cf(cf::TOKENS), h.as_bytes())? else {
            return Ok(None);
        };
        let i = v
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| corrupt(cf::TOKENS, "no separator"))?;
        let owner = (
            String::from_utf8_lossy(&v[..i]).into_owned(),
            String::from_utf8_lossy(&v[i + 1..]).into_owned(),
        );
        self.tokens.fill(generation, digest, &owner);
        Ok(Some(owner))
    }

    /// Iterates the keys of `cf_name` that start with `prefix`.
    pub(crate) fn scan<'a>(
        &'a self,
        cf_name: &'static str,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<super::KeyValue, StoreError>> + 'a {
        self.scan_from(cf_name, prefix, prefix)
    }

    /// Like [`Store::scan`], starting at `from` (a key at or after `prefix`).
    pub(crate) fn scan_from<'a>(
        &'a self,
        cf_name: &'static str,
        prefix: &[u8],
        from: &[u8],
    ) -> impl Iterator<Item = Result<super::KeyValue, StoreError>> + 'a {
        let mut opts = rocksdb::ReadOptions::default();
        if !prefix.is_empty() {
            opts.set_iterate_upper_bound(prefix_end(prefix));
        }
        self.scan_with(cf_name, opts, from)
    }

    /// Like [`Store::scan_from`], over a queue's rows (see [`super::queue_read_options`]).
    pub(crate) fn scan_queue<'a>(
        &'a self,
        cf_name: &'static str,
        prefix: &[u8],
        from: &[u8],
    ) -> impl Iterator<Item = Result<super::KeyValue, StoreError>> + 'a {
        self.scan_with(cf_name, super::queue_read_options(prefix), from)
    }

    fn scan_with<'a>(
        &'a self,
        cf_name: &'static str,
        opts: rocksdb::ReadOptions,
        from: &[u8],
    ) -> impl Iterator<Item = Result<super::KeyValue, StoreError>> + 'a {
        self.db()
            .iterator_cf_opt(
                self.cf(cf_name),
                opts,
                rocksdb::IteratorMode::From(from, rocksdb::Direction::Forward),
            )
            .map(|r| r.map_err(StoreError::from))
    }
}

#[cfg(test)]
mod tests {
    use super::super::temp_store;
    use super::*;

    #[test]
    fn hex_of_a_digest_is_lowercase_pairs() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_read_from_before_a_change_is_not_kept() {
        let c = TokenCache::default();
        let owner = ("@a:x".to_owned(), "D".to_owned());
        let before = c.get(&[1; 32]).unwrap_err();
        c.changed(); // the token was revoked while the read was under way
        c.fill(before, [1; 32], &owner);
        assert!(c.get(&[1; 32]).is_err(), "the stale read was dropped");
        let now = c.get(&[1; 32]).unwrap_err();
        c.fill(now, [1; 32], &owner);
        assert_eq!(c.get(&[1; 32]), Ok(owner));
        c.changed();
        assert!(c.get(&[1; 32]).is_err(), "a change forgets every owner");
    }

    #[tokio::test]
    async fn a_deletion_waits_for_rows_of_requests_that_found_the_device() {
        let (_d, s) = temp_store();
        s.add_device("@a:x", "D1").await.unwrap();
        // A request found D1 and is about to write its row...
        let stable = s.devices_stable().await;
        assert!(s.device_exists("@a:x", "D1").unwrap());
        let deleting = tokio::spawn({
            let s = s.clone();
            async move { s.delete_device("@a:x", "D1").await.unwrap() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !deleting.is_finished(),
            "the deletion waits for the request"
        );
        s.append(vec![super::super::Append::Inbox {
            user: "@a:x".into(),
            device: "D1".into(),
            event: b"{}".to_vec(),
        }])
        .await
        .unwrap();
        drop(stable);
        assert!(deleting.await.unwrap());
        // ...so the deletion takes that row with the device.
        assert_eq!(s.inbox_len("@a:x", "D1").unwrap(), 0);
        s.add_device("@a:x", "D1").await.unwrap();
        assert!(s.inbox_page("@a:x", "D1", 0, 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn devices_tokens_and_deletion() {
        let (_d, s) = temp_store();
        assert!(s.add_user("@a:x").await.unwrap());
        assert!(!s.add_user("@a:x").await.unwrap());
        let t1 = s.add_device("@a:x", "D1").await.unwrap();
        let t2 = s.add_device("@a:x", "D2").await.unwrap();
        s.add_device("@ab:x", "D9").await.unwrap();
        assert!(t1.len() >= 43, "at least 256 bits");
        assert_eq!(
            s.token_owner(&t1).unwrap(),
            Some(("@a:x".into(), "D1".into()))
        );
        assert_eq!(
            s.device_ids("@a:x").unwrap(),
            vec!["D1", "D2"],
            "@ab:x's devices are not @a:x's"
        );
        // Re-keying revokes the old token.
        let t1b = s.add_device("@a:x", "D1").await.unwrap();
        assert_eq!(s.token_owner(&t1).unwrap(), None);
        assert!(s.token_owner(&t1b).unwrap().is_some());
        assert!(s.token_owner(&t2).unwrap().is_some(), "now in memory");
        assert!(s.delete_device("@a:x", "D2").await.unwrap());
        assert!(!s.delete_device("@a:x", "D2").await.unwrap());
        assert_eq!(s.token_owner(&t2).unwrap(), None);
        assert_eq!(s.list_devices("@a:x").unwrap().len(), 1);
        assert_eq!(s.all_devices().unwrap().len(), 2);
        let recs: Vec<(String, String)> = s
            .device_records()
            .map(|r| r.map(|(u, d, _)| (u, d)))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(recs, s.all_devices().unwrap());
        // Stored hashed: the raw token is nowhere in the tokens CF.
        for item in s.scan(super::cf::TOKENS, b"") {
            let (k, _) = item.unwrap();
            assert!(!String::from_utf8_lossy(&k).contains(&t1b));
        }
    }
}
