//! The command-line side of the admin API: `courier user add`, `courier device
//! add|delete|list`, `courier destination|offload list|parked|requeue|discard` call the RUNNING server, never its store (RocksDB admits one process).
//!
//! Owns how the CLI finds and trusts the server, from the same config file:
//! - the first listener with the `admin` resource; a wildcard address (`0.0.0.0`,
//!   `[::]`) means the loopback address of that family;
//! - `[admin] token` as the bearer token;
//! - for a TLS listener, the listener's own certificate file as the ONLY trusted root
//!   (pinning, not "accept anything"): the generated one is checked against the name
//!   `localhost`, which it always lists; a configured chain against the host of
//!   `server_name`; either way the connection goes to the listener's address;
//! - plain HTTP when the listener has `tls = false`.
//!
//! It returns the server's JSON answer for the caller to print, and refusals as one
//! [`CliError`]. It never prints, and never retries a request.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::client::admin::PREFIX;
use crate::config::{Config, Resource};

/// One admin operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    UserAdd {
        user_id: String,
    },
    DeviceAdd {
        user_id: String,
        device_id: Option<String>,
    },
    DeviceDelete {
        user_id: String,
        device_id: String,
    },
    DeviceList {
        user_id: String,
    },
    DestinationList,
    DestinationParked {
        destination: String,
        from: Option<u64>,
        limit: usize,
    },
    DestinationRequeue {
        destination: String,
    },
    DestinationDiscard {
        destination: String,
    },
    OffloadList,
    /// `direction`: `outbound` (queue = destination) or `inbound` (queue = origin).
    OffloadParked {
        direction: String,
        queue: String,
        from: Option<u64>,
        limit: usize,
    },
    OffloadRequeue {
        direction: String,
        queue: String,
    },
    OffloadDiscard {
        direction: String,
        queue: String,
    },
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no listener in the configuration has the `admin` resource")]
    NoAdminListener,
    #[error("the admin API is disabled: no [admin] token in the configuration")]
    NoToken,
    #[error("cannot use the listener's certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the admin API answered {status} {errcode}: {message}")]
    Refused {
        status: u16,
        errcode: String,
        message: String,
    },
    #[error("unexpected answer from the admin API ({status}): {detail}")]
    BadAnswer { status: u16, detail: String },
}

/// Where the admin API of a configuration is, and how to talk to it.
pub struct Target {
    /// `https://localhost:PORT`, `https://host:PORT` or `http://ADDR`.
    pub base: String,
    client: reqwest::Client,
    token: String,
}

/// The loopback address for a wildcard bind address; other addresses as they are.
pub fn connect_addr(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

impl Target {
    /// Reads where and how to connect from `config` (and the listener's certificate).
    pub fn from_config(config: &Config) -> Result<Target, CliError> {
        let listener = config
            .listener_with(Resource::Admin)
            .ok_or(CliError::NoAdminListener)?;
        let token = config.admin.token.clone().ok_or(CliError::NoToken)?;
        let addr = connect_addr(listener.address);
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy();
        let (base, builder) = if !listener.tls {
            (format!("http://{addr}"), builder)
        } else {
            crate::tls::install_crypto_provider();
            let (cert_path, _) = crate::tls::cert_paths(config, listener);
            let roots = crate::tls::load_certs(&cert_path)?
                .iter()
                .map(|der| reqwest::Certificate::from_der(der))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CliError::Client(crate::error::chain(&e)))?;
            let host = if listener.tls_cert.is_none() {
                "localhost".to_owned()
            } else {
                config.server_name.host().to_owned()
            };
            let builder = builder.tls_certs_only(roots);
            let builder = if config.server_name.is_ip_literal() && listener.tls_cert.is_some() {
                builder
            } else {
                builder.resolve(&host, addr)
            };
            (format!("https://{host}:{}", addr.port()), builder)
        };
        let client = builder
            .build()
            .map_err(|e| CliError::Client(crate::error::chain(&e)))?;
        Ok(Target {
            base,
            client,
            token,
        })
    }

    /// Runs one command; the server's JSON answer on success.
    pub async fn run(&self, command: &Command) -> Result<Value, CliError> {
        let seg = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let (method, path, body) = match command {
            Command::UserAdd { user_id } => (
                reqwest::Method::POST,
                "/users".to_owned(),
                Some(json!({"user_id": user_id})),
            ),
            Command::DeviceAdd { user_id, device_id } => {
                let mut body = json!({"user_id": user_id});
                if let Some(d) = device_id {
                    body["device_id"] = json!(d);
                }
                (reqwest::Method::POST, "/devices".to_owned(), Some(body))
            }
            Command::DeviceDelete { user_id, device_id } => (
                reqwest::Method::DELETE,
                format!("/devices/{}/{}", seg(user_id), seg(device_id)),
                None,
            ),
            Command::DeviceList { user_id } => (
                reqwest::Method::GET,
                format!("/devices/{}", seg(user_id)),
                None,
            ),
            Command::DestinationList => (reqwest::Method::GET, "/destinations".to_owned(), None),
            Command::DestinationParked {
                destination,
                from,
                limit,
            } => (
                reqwest::Method::GET,
                format!(
                    "/destinations/{}/parked{}",
                    seg(destination),
                    page(*from, *limit)
                ),
                None,
            ),
            Command::DestinationRequeue { destination } => (
                reqwest::Method::POST,
                format!("/destinations/{}/requeue", seg(destination)),
                None,
            ),
            Command::DestinationDiscard { destination } => (
                reqwest::Method::POST,
                format!("/destinations/{}/discard", seg(destination)),
                None,
            ),
            Command::OffloadList => (reqwest::Method::GET, "/offload".to_owned(), None),
            Command::OffloadParked {
                direction,
                queue,
                from,
                limit,
            } => (
                reqwest::Method::GET,
                format!(
                    "/offload/{}/{}/parked{}",
                    seg(direction),
                    seg(queue),
                    page(*from, *limit)
                ),
                None,
            ),
            Command::OffloadRequeue { direction, queue } => (
                reqwest::Method::POST,
                format!("/offload/{}/{}/requeue", seg(direction), seg(queue)),
                None,
            ),
            Command::OffloadDiscard { direction, queue } => (
                reqwest::Method::POST,
                format!("/offload/{}/{}/discard", seg(direction), seg(queue)),
                None,
            ),
        };
        let url = format!("{}{PREFIX}{path}", self.base);
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| CliError::Unreachable {
            url: url.clone(),
            reason: crate::error::chain(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        let value: Option<Value> = serde_json::from_slice(&bytes).ok();
        match value {
            Some(v) if status.is_success() => Ok(v),
            Some(v) if v.get("errcode").is_some() => Err(CliError::Refused {
                status: status.as_u16(),
                errcode: v["errcode"].as_str().unwrap_or("?").to_owned(),
                message: v["error"].as_str().unwrap_or("").to_owned(),
            }),
            _ => Err(CliError::BadAnswer {
                status: status.as_u16(),
                detail: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            }),
        }
    }
}

/// The query of a page of parked entries.
fn page(from: Option<u64>, limit: usize) -> String {
    match from {
        Some(f) => format!("?limit={limit}&from={f}"),
        None => format!("?limit={limit}"),
    }
}

/// Runs `command` against the server `config` describes.
pub async fn run(config: &Config, command: &Command) -> Result<Value, CliError> {
    Target::from_config(config)?.run(command).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn wildcards_mean_loopback() {
        let a: SocketAddr = "0.0.0.0:8448".parse().unwrap();
        assert_eq!(connect_addr(a), "127.0.0.1:8448".parse().unwrap());
        let a: SocketAddr = "[::]:8448".parse().unwrap();
        assert_eq!(connect_addr(a), "[::1]:8448".parse().unwrap());
        let a: SocketAddr = "10.1.2.3:1".parse().unwrap();
        assert_eq!(connect_addr(a), a);
    }

    fn config(listeners: &str, admin: &str) -> Config {
        let text = format!(
            "server_name = \"example.org\"\ndata_dir = \"d\"\nsigning_key = \"k\"\n{listeners}\n{admin}\n"
        );
        Config::from_toml(&text, Path::new("/nonexistent")).unwrap()
    }

    #[test]
    fn target_selection() {
        let plain = "[[listeners]]\naddress = \"0.0.0.0:1\"\nresources = [\"client\"]\n\
                     [[listeners]]\naddress = \"0.0.0.0:2\"\ntls = false\nresources = [\"admin\"]\n";
        let token = "[admin]\ntoken = \"0123456789abcdef\"";
        let t = Target::from_config(&config(plain, token)).unwrap();
        assert_eq!(t.base, "http://127.0.0.1:2");
        assert!(matches!(
            Target::from_config(&config(plain, "")),
            Err(CliError::NoToken)
        ));
        let no_admin = "[[listeners]]\naddress = \"0.0.0.0:1\"\nresources = [\"client\"]\n";
        assert!(matches!(
            Target::from_config(&config(no_admin, token)),
            Err(CliError::NoAdminListener)
        ));
        // TLS with a generated certificate that does not exist yet: a clear error.
        let tls = "[[listeners]]\naddress = \"0.0.0.0:3\"\nresources = [\"admin\"]\n";
        assert!(matches!(
            Target::from_config(&config(tls, token)),
            Err(CliError::Tls(_))
        ));
    }
}
