//! Idempotency markers: what was already accepted, so a retry is not processed twice.
//!
//! Key layout (values are the acceptance time, big-endian ms, so the compaction filter
//! in `store::open` can expire them after `dedupe_ttl`):
//! - `client_txns`:  `user \0 device \0 event_type \0 txn_id`
//! - `inbound_txns`: `origin \0 txn_id`
//! - `message_ids`:  `origin \0 message_id`
//! - `custody_txns`: `dir \0 queue \0 txn_id` (offload mode, see `store::custody`)
//!
//! Markers are written in the same batch as the work they guard, never on their own.

use super::{Batch, Store, StoreError, cf, key, now_ms};

/// Which marker family.
#[derive(Debug, Clone, Copy)]
pub enum Marker {
    /// A client's `sendToDevice` (user, device, event type, txnId).
    ClientTxn,
    /// An inbound federation transaction (origin, txnId).
    InboundTxn,
    /// An inbound to-device EDU (origin, message_id).
    MessageId,
    /// A transaction taken into custody in offload mode (direction, queue, txnId).
    CustodyTxn,
}

impl Marker {
    pub(crate) fn cf(self) -> &'static str {
        match self {
            Marker::ClientTxn => cf::CLIENT_TXNS,
            Marker::InboundTxn => cf::INBOUND_TXNS,
            Marker::MessageId => cf::MESSAGE_IDS,
            Marker::CustodyTxn => cf::CUSTODY_TXNS,
        }
    }
}

impl Store {
    pub fn seen(&self, marker: Marker, parts: &[&str]) -> Result<bool, StoreError> {
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        Ok(self
            .db()
            .get_pinned_cf(self.cf(marker.cf()), key(&parts))?
            .is_some())
    }

    /// Records the marker (in `b`).
    pub fn mark(&self, b: &mut Batch, marker: Marker, parts: &[&str]) {
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        b.0.put_cf(self.cf(marker.cf()), key(&parts), now_ms().to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Batch, temp_store};
    use super::*;

    #[tokio::test]
    async fn markers_are_per_family_and_per_parts() {
        let (_d, s) = temp_store();
        let mut b = Batch::new();
        s.mark(&mut b, Marker::InboundTxn, &["o.test", "t1"]);
        s.commit(b).await.unwrap();
        assert!(s.seen(Marker::InboundTxn, &["o.test", "t1"]).unwrap());
        assert!(!s.seen(Marker::MessageId, &["o.test", "t1"]).unwrap());
        assert!(!s.seen(Marker::InboundTxn, &["o.test", "t2"]).unwrap());
        assert!(!s.seen(Marker::InboundTxn, &["o.tes", "tt1"]).unwrap());
    }

    #[tokio::test]
    async fn markers_expire_after_the_ttl_at_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::store::StoreOptions {
            dedupe_ttl: std::time::Duration::from_millis(1),
        };
        let s = Store::open(dir.path(), &opts).unwrap();
        let mut b = Batch::new();
        s.mark(&mut b, Marker::MessageId, &["o.test", "old"]);
        s.commit(b).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = Batch::new();
        s.mark(&mut b, Marker::ClientTxn, &["@a:x", "D", "m.t", "t"]);
        s.commit(b).await.unwrap();
        for m in [Marker::MessageId, Marker::ClientTxn] {
            s.db().flush_cf(s.cf(m.cf())).unwrap();
            s.db()
                .compact_range_cf(s.cf(m.cf()), None::<&[u8]>, None::<&[u8]>);
        }
        assert!(
            !s.seen(Marker::MessageId, &["o.test", "old"]).unwrap(),
            "expired"
        );
        // With a long TTL nothing is dropped.
        drop(s);
        let s = Store::open(dir.path(), &crate::store::StoreOptions::default()).unwrap();
        let mut b = Batch::new();
        s.mark(&mut b, Marker::MessageId, &["o.test", "new"]);
        s.commit(b).await.unwrap();
        s.db().flush_cf(s.cf(cf::MESSAGE_IDS)).unwrap();
        s.db()
            .compact_range_cf(s.cf(cf::MESSAGE_IDS), None::<&[u8]>, None::<&[u8]>);
        assert!(s.seen(Marker::MessageId, &["o.test", "new"]).unwrap());
    }
}
