//! Everything courier says to, and hears from, other Matrix servers.
//!
//! - [`discovery`]: server name -> address and TLS name, with the SSRF guard.
//! - [`client`]: the signed outbound HTTP client.
//! - [`keys`]: our published keys and the cache of other servers' keys.
//! - [`routes`]: the federation HTTP endpoints courier serves; [`transaction`] and
//!   [`inbound`]: a received `/send`, read in place and stored.
//! - [`sender`]: per-destination delivery; [`edu`] and [`wire`]: the EDUs it sends.

pub mod admin;
pub mod auth;
pub mod client;
pub mod discovery;
pub mod edu;
pub mod inbound;
pub mod keys;
pub mod limit;
pub mod retry;
pub mod routes;
pub mod sender;
pub mod transaction;
pub mod wire;
