//! The configuration file: typed, validated once at start, passed explicitly.
//!
//! Owns the TOML schema (`config/courier.toml` is the documented example) and the
//! rules that make a configuration valid. Unknown keys and bad values are refused with
//! a message that names the field. Relative paths are resolved against the folder of
//! the config file, so two configs in two folders never share a store.
//!
//! It must never read anything but the config file itself: keys, certificates and the
//! store are opened by the modules that own them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ids::ServerName;

/// A whole, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Matrix server name courier is authoritative for (`host` or `host:port`).
    pub server_name: ServerName,
    /// Where RocksDB and generated TLS material live.
    pub data_dir: PathBuf,
    /// Synapse-format signing key file; generated on first start if absent.
    pub signing_key: PathBuf,
    /// The sockets courier serves.
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub federation: Federation,
    #[serde(default)]
    pub client: Client,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub offload: Offload,
}

/// One listening socket and what it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: SocketAddr,
    /// HTTPS when true (the default); plain HTTP must be asked for explicitly.
    #[serde(default = "yes")]
    pub tls: bool,
    /// PEM certificate chain; with `tls_key`. Absent: a self-signed pair in `data_dir`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub resources: Vec<Resource>,
}

/// The route groups a listener can mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// `/_matrix/federation/*` and `/_matrix/key/*`.
    Federation,
    /// `/_matrix/client/*`.
    Client,
    /// `/_courier/admin/*` (needs `[admin] token`) and `/metrics`.
    Admin,
    /// Offload mode, outbound: the homeserver's federation proxy
    /// (`outbound_federation_restricted_to`); needs `[offload] secret`.
    Offload,
    /// Offload mode, inbound: `/_matrix/federation/v1/send/*` addressed to the
    /// homeserver (routed here by its reverse proxy); other federation requests are
    /// passed through to it. Needs `[offload] homeserver_name` and `homeserver_url`.
    Edge,
}

/// Which outbound `/send` transactions courier takes into custody in offload mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Custody {
    /// Transactions carrying only EDUs; those with PDUs are passed through and
    /// answered with the destination's real answer.
    Edus,
    /// Every `/send`, PDUs included (answered `{"pdus": {}}` at once).
    All,
}

/// Offload mode: courier carries a homeserver's federation transactions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Offload {
    /// Bearer secret the homeserver presents (Synapse: `worker_replication_secret`).
    pub secret: Option<String>,
    /// What outbound `/send` courier holds: `edus` (default) or `all`.
    pub custody: Custody,
    /// The homeserver's server name (what inbound transactions must be addressed to).
    pub homeserver_name: Option<ServerName>,
    /// Where inbound transactions are replayed: the homeserver's federation listener.
    pub homeserver_url: Option<String>,
    /// False accepts any certificate from `homeserver_url` (self-signed, loopback).
    pub verify_homeserver_certificate: bool,
    /// Longest wait between two replays to an unreachable homeserver.
    #[serde(with = "humantime_serde")]
    pub homeserver_backoff_max: Duration,
    /// Timeout of one passed-through request (queries, joins, media...).
    #[serde(with = "humantime_serde")]
    pub passthrough_timeout: Duration,
}

impl Default for Offload {
    fn default() -> Self {
        Offload {
            secret: None,
            custody: Custody::Edus,
            homeserver_name: None,
            homeserver_url: None,
            verify_homeserver_certificate: true,
            homeserver_backoff_max: Duration::from_secs(60),
            passthrough_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Federation {
    /// Lets courier send to loopback and private addresses (test setups, LANs).
    pub allow_private_destinations: bool,
    /// False accepts any certificate from peers (test setups only).
    pub verify_certificates: bool,
    /// How far ahead our published keys claim validity (`valid_until_ts`).
    #[serde(with = "humantime_serde")]
    pub key_validity: Duration,
    /// Static server-name -> `host:port` mappings that bypass discovery.
    pub overrides: BTreeMap<String, String>,
    /// Largest inbound federation request body.
    pub max_request_bytes: usize,
    /// Byte budget of one outbound transaction body.
    pub max_transaction_bytes: usize,
    /// How long `(origin, txnId)` and `(origin, message_id)` markers are remembered.
    #[serde(with = "humantime_serde")]
    pub dedupe_ttl: Duration,
    /// First wait after a failed delivery to a destination.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Growth factor of the wait after each further failure.
    pub backoff_multiplier: f64,
    /// Longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Timeout of one outbound request, connection included.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// EDUs queued for one destination at most; beyond it `sendToDevice` answers 429.
    pub max_queued_per_destination: u64,
    /// Transactions in flight at once, over all destinations (outbound connections),
    /// at most: the ceiling of `federation::limit`.
    pub max_concurrent_transactions: usize,
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            allow_private_destinations: false,
            verify_certificates: true,
            key_validity: Duration::from_secs(7 * 24 * 3600),
            overrides: BTreeMap::new(),
            max_request_bytes: 8 * 1024 * 1024,
            max_transaction_bytes: 1024 * 1024,
            dedupe_ttl: Duration::from_secs(7 * 24 * 3600),
            backoff_initial: Duration::from_secs(5),
            backoff_multiplier: 2.0,
            backoff_max: Duration::from_secs(2 * 3600),
            request_timeout: Duration::from_secs(60),
            max_queued_per_destination: 1_000_000,
            max_concurrent_transactions: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Client {
    /// Largest content of one to-device message (canonical JSON bytes), as Synapse.
    pub max_message_bytes: usize,
    /// Largest `sendToDevice` request body.
    pub max_request_bytes: usize,
    /// Messages kept per device inbox; beyond it the oldest are dropped with a warning.
    pub max_inbox_messages: u64,
    /// A device that has not synced for this long has its pending messages purged.
    #[serde(with = "humantime_serde")]
    pub inactive_device_purge: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            max_message_bytes: 64 * 1024,
            max_request_bytes: 16 * 1024 * 1024,
            max_inbox_messages: 100_000,
            inactive_device_purge: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Bearer token of the admin API; absent = admin API off.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A `tracing` filter: `info`, `debug`, `courier=debug,info`, ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn yes() -> bool {
    true
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates `path`; relative paths inside become relative to
    /// the folder that holds it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::from_toml(&text, &base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { field, message, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text, resolving relative paths against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        config.data_dir = base.join(&config.data_dir);
        config.signing_key = base.join(&config.signing_key);
        for l in &mut config.listeners {
            l.tls_cert = l.tls_cert.as_ref().map(|p| base.join(p));
            l.tls_key = l.tls_key.as_ref().map(|p| base.join(p));
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, message: &str| {
            Err(ConfigError::Invalid {
                path: PathBuf::new(),
                field: field.to_owned(),
                message: message.to_owned(),
            })
        };
        if self.listeners.is_empty() {
            return bad("listeners", "at least one [[listeners]] entry is needed");
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.resources.is_empty() {
                return bad(&format!("listeners[{i}].resources"), "must not be empty");
            }
            if l.tls_cert.is_some() != l.tls_key.is_some() {
                return bad(
                    &format!("listeners[{i}].tls_cert"),
                    "tls_cert and tls_key go together: give both or neither",
                );
            }
            if !l.tls && (l.tls_cert.is_some()) {
                return bad(
                    &format!("listeners[{i}].tls"),
                    "tls = false but a certificate is configured",
                );
            }
            let has = |r| l.resources.contains(&r);
            if has(Resource::Offload) && l.resources.len() > 1 {
                return bad(
                    &format!("listeners[{i}].resources"),
                    "\"offload\" takes a listener of its own",
                );
            }
            if has(Resource::Edge) && has(Resource::Federation) {
                return bad(
                    &format!("listeners[{i}].resources"),
                    "\"edge\" and \"federation\" both serve /_matrix/federation: use two listeners",
                );
            }
            if has(Resource::Offload)
                && !l.tls
                && !crate::federation::discovery::is_private(l.address.ip())
            {
                return bad(
                    &format!("listeners[{i}].tls"),
                    "an offload listener may use plain HTTP only on a loopback or private address",
                );
            }
            if has(Resource::Offload) {
                match &self.offload.secret {
                    None => return bad("offload.secret", "an \"offload\" listener needs a secret"),
                    Some(s) if s.len() < 16 => {
                        return bad("offload.secret", "must be at least 16 characters long");
                    }
                    Some(_) => {}
                }
            }
            if has(Resource::Edge) {
                if self.offload.homeserver_name.is_none() {
                    return bad("offload.homeserver_name", "an \"edge\" listener needs it");
                }
                match &self.offload.homeserver_url {
                    None => return bad("offload.homeserver_url", "an \"edge\" listener needs it"),
                    Some(u) => match reqwest::Url::parse(u) {
                        Ok(url)
                            if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                        }
                        _ => {
                            return bad(
                                "offload.homeserver_url",
                                "must be an http:// or https:// URL",
                            );
                        }
                    },
                }
            }
        }
        if let Some(token) = &self.admin.token
            && token.len() < 16
        {
            return bad("admin.token", "must be at least 16 characters long");
        }
        let f = &self.federation;
        if !(f.backoff_multiplier >= 1.0 && f.backoff_multiplier <= 100.0) {
            return bad("federation.backoff_multiplier", "must be between 1 and 100");
        }
        if f.backoff_initial.is_zero() || f.backoff_initial > f.backoff_max {
            return bad(
                "federation.backoff_initial",
                "must be positive and not above backoff_max",
            );
        }
        if f.key_validity < Duration::from_secs(3600) {
            return bad(
                "federation.key_validity",
                "must be at least 1h (the spec: never serve keys that expire within an hour)",
            );
        }
        if f.max_queued_per_destination == 0 {
            return bad("federation.max_queued_per_destination", "must be positive");
        }
        if f.max_concurrent_transactions == 0 {
            return bad("federation.max_concurrent_transactions", "must be positive");
        }
        if f.max_transaction_bytes < 64 * 1024 {
            return bad(
                "federation.max_transaction_bytes",
                "must be at least 64 KiB",
            );
        }
        for (name, target) in &f.overrides {
            if ServerName::parse(name).is_err() {
                return bad(
                    &format!("federation.overrides.{name}"),
                    "the key is not a server name",
                );
            }
            if crate::ids::split_host_port(target)
                .and_then(|(_, p)| p)
                .is_none()
            {
                return bad(
                    &format!("federation.overrides.{name}"),
                    "the target must be host:port",
                );
            }
        }
        if self.client.max_message_bytes == 0
            || self.client.max_message_bytes > self.client.max_request_bytes
        {
            return bad(
                "client.max_message_bytes",
                "must be positive and not above client.max_request_bytes",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(
                "log.level",
                "not a valid filter (e.g. \"info\", \"courier=debug\")",
            );
        }
        Ok(())
    }

    /// The first listener serving `resource`.
    pub fn listener_with(&self, resource: Resource) -> Option<&Listener> {
        self.listeners
            .iter()
            .find(|l| l.resources.contains(&resource))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        server_name = "127.0.0.1:8448"
        data_dir = "../data"
        signing_key = "../keys/signing.key"
        [[listeners]]
        address = "127.0.0.1:8448"
        resources = ["federation", "client"]
    "#;

    fn err(text: &str) -> String {
        Config::from_toml(text, Path::new("/etc/courier"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = Config::from_toml(MINIMAL, Path::new("/etc/courier")).unwrap();
        assert_eq!(c.server_name.as_str(), "127.0.0.1:8448");
        assert_eq!(c.data_dir, Path::new("/etc/courier/../data"));
        assert_eq!(c.signing_key, Path::new("/etc/courier/../keys/signing.key"));
        assert!(c.listeners[0].tls);
        assert!(c.federation.verify_certificates);
        assert!(!c.federation.allow_private_destinations);
        assert_eq!(c.federation.key_validity, Duration::from_secs(7 * 86400));
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(c.admin.token.is_none());
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config/courier.toml");
        let c = Config::from_toml(text, Path::new("config")).unwrap();
        assert!(c.listener_with(Resource::Federation).is_some());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = err(&format!("{MINIMAL}\n[federation]\nverify_certs = false\n"));
        assert!(e.contains("verify_certs"), "{e}");
        let e = err(&format!("colour = 1\n{MINIMAL}"));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = err(&MINIMAL.replace(
            "\"127.0.0.1:8448\"\n        data_dir",
            "\"bad name!\"\n        data_dir",
        ));
        assert!(e.contains("server_name") || e.contains("bad name"), "{e}");
        let e = err(&MINIMAL.replace("address = \"127.0.0.1:8448\"", "address = \"nowhere\""));
        assert!(e.contains("address"), "{e}");
        let e = err(&MINIMAL.replace("\"client\"]", "\"client\", \"gopher\"]"));
        assert!(e.contains("gopher"), "{e}");
        let e = err(&format!("{MINIMAL}\n[log]\nformat = \"xml\"\n"));
        assert!(e.contains("xml"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[federation]\nbackoff_initial = \"soon\"\n"
        ));
        assert!(e.contains("backoff_initial"), "{e}");
        let e = err(&format!("{MINIMAL}\n[admin]\ntoken = \"short\"\n"));
        assert!(e.contains("admin.token"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[federation.overrides]\n\"example.org\" = \"10.0.0.5\"\n"
        ));
        assert!(e.contains("federation.overrides.example.org"), "{e}");
        let e = err(&MINIMAL.replace("resources = [\"federation\", \"client\"]", "resources = []"));
        assert!(e.contains("listeners[0].resources"), "{e}");
    }

    #[test]
    fn offload_listeners_need_their_settings() {
        let offload = MINIMAL.replace(
            "resources = [\"federation\", \"client\"]",
            "tls = false\n        resources = [\"offload\"]",
        );
        let e = err(&offload);
        assert!(e.contains("offload.secret"), "{e}");
        let e = err(&format!("{offload}\n[offload]\nsecret = \"short\"\n"));
        assert!(e.contains("offload.secret"), "{e}");
        let ok = format!("{offload}\n[offload]\nsecret = \"0123456789abcdef0\"\n");
        let c = Config::from_toml(&ok, Path::new(".")).unwrap();
        assert_eq!(c.offload.custody, Custody::Edus);
        let e = err(&ok.replace("127.0.0.1:8448", "8.8.8.8:8448"));
        assert!(e.contains("listeners[0].tls"), "{e}");
        let e = err(&MINIMAL.replace("\"client\"]", "\"offload\"]"));
        assert!(e.contains("listeners[0].resources"), "{e}");

        let edge = MINIMAL.replace("[\"federation\", \"client\"]", "[\"edge\"]");
        let e = err(&edge);
        assert!(e.contains("offload.homeserver_name"), "{e}");
        let e = err(&format!(
            "{edge}\n[offload]\nhomeserver_name = \"hs.test\"\nhomeserver_url = \"ftp://x\"\n"
        ));
        assert!(e.contains("offload.homeserver_url"), "{e}");
        Config::from_toml(
            &format!(
                "{edge}\n[offload]\nhomeserver_name = \"hs.test\"\nhomeserver_url = \"http://127.0.0.1:8008\"\ncustody = \"all\"\n"
            ),
            Path::new("."),
        )
        .unwrap();
        let e = err(&MINIMAL.replace("\"client\"]", "\"edge\"]"));
        assert!(e.contains("listeners[0].resources"), "{e}");
    }

    #[test]
    fn durations_are_human() {
        let c = Config::from_toml(
            &format!("{MINIMAL}\n[federation]\nbackoff_initial = \"2s\"\nbackoff_max = \"3h\"\n"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.federation.backoff_initial, Duration::from_secs(2));
        assert_eq!(c.federation.backoff_max, Duration::from_secs(3 * 3600));
    }
}
