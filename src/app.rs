//! The shared state handed to every request handler and background task.
//!
//! `App` is a small, cheap-to-clone handle: configuration, store, our signing key and
//! the federation services. It holds no logic of its own, and nothing in it is global.

use std::ops::Deref;
use std::sync::Arc;

use crate::client::send::TxnLocks;
use crate::config::Config;
use crate::federation::client::FederationClient;
use crate::federation::inbound::InFlight;
use crate::federation::keys::RemoteKeys;
use crate::federation::sender::{Sender, SenderConfig};
use crate::notify::Notifier;
use crate::offload::relay::Relay;
use crate::signing::SigningKey;
use crate::store::Store;

#[derive(Clone)]
pub struct App(Arc<AppInner>);

pub struct AppInner {
    pub config: Config,
    pub store: Store,
    pub key: Arc<SigningKey>,
    pub federation: Arc<FederationClient>,
    pub remote_keys: Arc<RemoteKeys>,
    pub sender: Sender,
    pub notifier: Notifier,
    /// Origins with a transaction being processed.
    pub inbound_inflight: InFlight,
    /// Offload mode: replays held transactions.
    pub relay: Relay,
    /// Offload mode: custody queues with a transaction being accepted.
    pub custody_inflight: InFlight,
    /// `sendToDevice` transactions being accepted: one set for the whole server, so
    /// a retransmission is serialized with its first attempt whichever listener
    /// each came through.
    pub txn_locks: Arc<TxnLocks>,
    /// Held while an operator requeues or discards parked entries (`crate::parked`).
    pub requeue_lock: tokio::sync::Mutex<()>,
}

impl App {
    pub fn new(config: Config, store: Store, key: SigningKey) -> Result<App, reqwest::Error> {
        let key = Arc::new(key);
        let federation = Arc::new(FederationClient::new(
            config.server_name.clone(),
            key.clone(),
            &config.federation,
        )?);
        let remote_keys = Arc::new(RemoteKeys::new(store.clone(), federation.clone()));
        let sender = Sender::new(
            store.clone(),
            federation.clone(),
            SenderConfig::from_config(&config.federation),
        );
        let relay = Relay::new(
            store.clone(),
            federation.clone(),
            remote_keys.clone(),
            &config,
        )?;
        Ok(App(Arc::new(AppInner {
            config,
            store,
            key,
            federation,
            remote_keys,
            sender,
            notifier: Notifier::default(),
            inbound_inflight: InFlight::default(),
            relay,
            custody_inflight: InFlight::default(),
            txn_locks: Arc::default(),
            requeue_lock: tokio::sync::Mutex::default(),
        })))
    }
}

impl Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}
