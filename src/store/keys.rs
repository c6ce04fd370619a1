//! Remote servers' verify keys, cached so a restart does not refetch them.
//!
//! Key layout: `server_keys`: `server_name \0 key_id` -> JSON [`CachedKey`].
//! Only keys whose server self-signature was checked may be written here; this
//! module trusts its callers for that and never fetches anything itself.

use serde::{Deserialize, Serialize};

use super::{Batch, Store, StoreError, cf, key};

/// One remote verify key as cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedKey {
    /// Unpadded base64 ed25519 public key.
    pub key: String,
    /// The server's `valid_until_ts`, already capped to fetch time + 7 days.
    pub valid_until_ts: u64,
    /// When we fetched it (ms).
    pub fetched_ts: u64,
}

impl Store {
    /// The cached key `key_id` of `server`, if any (expired ones included: the
    /// caller decides).
    pub fn server_key(&self, server: &str, key_id: &str) -> Result<Option<CachedKey>, StoreError> {
        let k = key(&[server.as_bytes(), key_id.as_bytes()]);
        match self.db().get_cf(self.cf(cf::SERVER_KEYS), k)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    cf: cf::SERVER_KEYS,
                    detail: e.to_string(),
                }),
        }
    }

    /// Caches verified keys of `server` (key id -> key), durably, in place of those
    /// cached before: a key the server no longer lists in `verify_keys` (rotated out,
    /// or moved to `old_verify_keys`) no longer authenticates its requests.
    pub async fn put_server_keys(
        &self,
        server: &str,
        keys: &[(String, CachedKey)],
    ) -> Result<(), StoreError> {
        let mut b = Batch::new();
        let prefix = key(&[server.as_bytes(), b""]);
        for item in self.scan(cf::SERVER_KEYS, &prefix) {
            let (k, _) = item?;
            let key_id = &k[prefix.len()..];
            if !keys.iter().any(|(id, _)| id.as_bytes() == key_id) {
                b.0.delete_cf(self.cf(cf::SERVER_KEYS), k);
            }
        }
        for (key_id, k) in keys {
            let v = serde_json::to_vec(k).expect("plain struct serializes");
            b.0.put_cf(
                self.cf(cf::SERVER_KEYS),
                key(&[server.as_bytes(), key_id.as_bytes()]),
                v,
            );
        }
        self.commit(b).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::temp_store;
    use super::*;

    #[tokio::test]
    async fn keys_round_trip_and_are_per_server() {
        let (_d, s) = temp_store();
        let k = CachedKey {
            key: "abc".into(),
            valid_until_ts: 10,
            fetched_ts: 5,
        };
        s.put_server_keys("a.example", &[("ed25519:1".into(), k.clone())])
            .await
            .unwrap();
        assert_eq!(
            s.server_key("a.example", "ed25519:1").unwrap(),
            Some(k.clone())
        );
        assert_eq!(s.server_key("a.example", "ed25519:2").unwrap(), None);
        assert_eq!(s.server_key("a.exampl", "ed25519:1").unwrap(), None);
        // A later list replaces the earlier one; other servers keep theirs.
        s.put_server_keys("a.exampl", &[("ed25519:1".into(), k.clone())])
            .await
            .unwrap();
        s.put_server_keys("a.example", &[("ed25519:2".into(), k.clone())])
            .await
            .unwrap();
        assert_eq!(s.server_key("a.example", "ed25519:1").unwrap(), None);
        assert_eq!(
            s.server_key("a.example", "ed25519:2").unwrap(),
            Some(k.clone())
        );
        assert_eq!(s.server_key("a.exampl", "ed25519:1").unwrap(), Some(k));
    }
}
