//! courier: a Matrix federation relay for to-device ("out-of-band") events.
//!
//! Reading order: [`config`] (what an operator sets), [`signing`] (canonical JSON,
//! ed25519, X-Matrix: pure code), [`store`] (everything durable, RocksDB),
//! [`federation`] (talking to other servers), [`client`] (what clients and the admin
//! call), [`server`] (start-up, listeners, shutdown). `ARCHITECTURE.md` draws the map and states the invariants.

pub mod admin_cli;
pub mod app;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod federation;
pub mod ids;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod offload;
pub mod parked;
pub mod server;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wakeups;
