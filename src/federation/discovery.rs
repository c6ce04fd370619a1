//! Server discovery: which address and which TLS name reach a server name.
//!
//! Owns the spec's resolution order (IP literal or explicit port -> direct;
//! `/.well-known/matrix/server` -> SRV `_matrix-fed._tcp` -> legacy `_matrix._tcp` ->
//! port 8448), the operator's static overrides, the caches, and the SSRF guard: no
//! connection to a loopback/private/reserved address unless the config allows it.
//! Every outbound federation connection resolves through [`GuardedResolver`], so the
//! guard cannot be bypassed by a hostname that resolves to 127.0.0.1.
//!
//! The URL keeps the server name (or the delegated name) as its host, so SNI and
//! `Host` are what the spec asks; the resolver maps that name to SRV targets.
//! It never sends a federation request itself.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::{ServerName, split_host_port};

/// Where to send requests for one server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` for the URL: the TLS name and the `Host` header.
    pub authority: String,
    /// A `Host` header that differs from the URL authority (static overrides).
    pub host_header: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "{0}: destination address is private or loopback (federation.allow_private_destinations is off)"
    )]
    Forbidden(String),
    #[error("{0}: cannot resolve: {1}")]
    Resolve(String, String),
}

/// Is `ip` outside the public internet (loopback, private, link-local, reserved...)?
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// Pinned addresses for names (SRV targets, overrides), shared with the resolver.
type Pins = Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>;

/// reqwest's DNS hook: pinned addresses first, else the system resolver; then the
/// SSRF guard on every address.
#[derive(Clone)]
pub struct GuardedResolver {
    pins: Pins,
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let pinned = this.pins.lock().expect("pins").get(&host).cloned();
            let addrs: Vec<SocketAddr> = match pinned {
                Some(a) => a,
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| this.allow_private || !is_private(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(DiscoveryError::Forbidden(host)) as _);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Resolves server names to endpoints, with caching.
pub struct Discovery {
    overrides: BTreeMap<String, String>,
    allow_private: bool,
    pins: Pins,
    http: reqwest::Client,
    cache: Mutex<HashMap<String, (Endpoint, Instant)>>,
}

const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
const FAILURE_TTL: Duration = Duration::from_secs(600);
const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;

impl Discovery {
    /// `http` is used for `.well-known` only and must resolve through `resolver()`.
    pub fn new(overrides: BTreeMap<String, String>, allow_private: bool) -> Self {
        Discovery {
            overrides,
            allow_private,
            pins: Arc::default(),
            http: reqwest::Client::new(),
            cache: Mutex::default(),
        }
    }

    /// The DNS hook every federation client must use.
    pub fn resolver(&self) -> GuardedResolver {
        GuardedResolver {
            pins: self.pins.clone(),
            allow_private: self.allow_private,
        }
    }

    /// Sets the client used for `.well-known` lookups (built with [`Self::resolver`]).
    pub fn set_http(&mut self, http: reqwest::Client) {
        self.http = http;
    }

    fn check_ip(&self, name: &str, ip: IpAddr) -> Result<(), DiscoveryError> {
        if !self.allow_private && is_private(ip) {
            return Err(DiscoveryError::Forbidden(name.to_owned()));
        }
        Ok(())
    }

    fn literal_ip(host: &str) -> Option<IpAddr> {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }

    /// Where requests for `name` go.
    pub async fn resolve(&self, name: &ServerName) -> Result<Endpoint, DiscoveryError> {
        let key = name.as_str();
        if let Some(target) = self.overrides.get(key) {
            if let Some((host, _)) = split_host_port(target)
                && let Some(ip) = Self::literal_ip(host)
            {
                self.check_ip(key, ip)?;
            }
            return Ok(Endpoint {
                authority: target.clone(),
                host_header: Some(key.to_owned()),
            });
        }
        // 1./2. IP literal, or explicit port: no delegation.
        if let Some(ip) = Self::literal_ip(name.host()) {
            self.check_ip(key, ip)?;
            let port = name.port().unwrap_or(8448);
            return Ok(Endpoint {
                authority: format_authority(name.host(), port),
                host_header: Some(key.to_owned()),
            });
        }
        if name.port().is_some() {
            return Ok(Endpoint {
                authority: key.to_owned(),
                host_header: None,
            });
        }
        if let Some((ep, until)) = self.cache.lock().expect("cache").get(key).cloned()
            && until > Instant::now()
        {
            return Ok(ep);
        }
        let (ep, ttl) = self.discover(name).await?;
        self.cache
            .lock()
            .expect("cache")
            .insert(key.to_owned(), (ep.clone(), Instant::now() + ttl));
        Ok(ep)
    }

    async fn discover(&self, name: &ServerName) -> Result<(Endpoint, Duration), DiscoveryError> {
        let host = name.host();
        // 3. .well-known delegation.
        let (delegated, ttl) = match self.well_known(host).await {
            Ok((d, ttl)) => (Some(d), ttl),
            Err(ttl) => (None, ttl),
        };
        let target = delegated.as_deref().unwrap_or(host);
        let (t_host, t_port) = split_host_port(target)
            .ok_or_else(|| DiscoveryError::Resolve(target.into(), "bad delegation".into()))?;
        if let Some(ip) = Self::literal_ip(t_host) {
            self.check_ip(name.as_str(), ip)?;
            let port = t_port.unwrap_or(8448);
            return Ok((
                Endpoint {
                    authority: format_authority(t_host, port),
                    host_header: Some(target.to_owned()),
                },
                ttl,
            ));
        }
        if t_port.is_some() {
            return Ok((
                Endpoint {
                    authority: target.to_owned(),
                    host_header: None,
                },
                ttl,
            ));
        }
        // 4./5. SRV records.
        if let Some(addrs) = self.srv(t_host).await {
            self.pins
                .lock()
                .expect("pins")
                .insert(t_host.to_owned(), addrs);
            return Ok((
                Endpoint {
                    authority: t_host.to_owned(),
                    host_header: None,
                },
                ttl,
            ));
        }
        // 6. Port 8448.
        Ok((
            Endpoint {
                authority: format!("{t_host}:8448"),
                host_header: None,
            },
            ttl,
        ))
    }

    /// `Ok((m.server, cache ttl))`, or `Err(ttl to cache the absence)`.
    async fn well_known(&self, host: &str) -> Result<(String, Duration), Duration> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|_| FAILURE_TTL)?;
        if !resp.status().is_success() {
            return Err(FAILURE_TTL);
        }
        let ttl = cache_ttl(resp.headers()).unwrap_or(WELL_KNOWN_DEFAULT_TTL);
        let body = resp.bytes().await.map_err(|_| FAILURE_TTL)?;
        if body.len() > WELL_KNOWN_MAX_BYTES {
            return Err(FAILURE_TTL);
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| FAILURE_TTL)?;
        let server = v
            .get("m.server")
            .and_then(|s| s.as_str())
            .ok_or(FAILURE_TTL)?;
        ServerName::parse(server).map_err(|_| FAILURE_TTL)?;
        Ok((server.to_owned(), ttl))
    }

    async fn srv(&self, host: &str) -> Option<Vec<SocketAddr>> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .ok()?
            .build()
            .ok()?;
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let Ok(lookup) = resolver.srv_lookup(format!("{service}.{host}.")).await else {
                continue;
            };
            let mut records: Vec<(u16, u16, String, u16)> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::SRV(s) => Some((
                        s.priority,
                        u16::MAX - s.weight,
                        s.target.to_utf8().trim_end_matches('.').to_owned(),
                        s.port,
                    )),
                    _ => None,
                })
                .collect();
            records.sort();
            let mut addrs = Vec::new();
            for (_, _, target, port) in records {
                if let Ok(found) = tokio::net::lookup_host((target.as_str(), port)).await {
                    addrs.extend(found);
                }
            }
            if !addrs.is_empty() {
                return Some(addrs);
            }
        }
        None
    }
}

fn format_authority(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

/// `Cache-Control: max-age=N`, capped at 48 h.
fn cache_ttl(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let cc = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    cc.split(',').find_map(|d| {
        let secs: u64 = d.trim().strip_prefix("max-age=")?.parse().ok()?;
        Some(Duration::from_secs(secs).min(WELL_KNOWN_MAX_TTL))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(allow_private: bool, overrides: &[(&str, &str)]) -> Discovery {
        Discovery::new(
            overrides
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            allow_private,
        )
    }

    #[test]
    fn private_ranges() {
        for p in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(p.parse().unwrap()), "{p}");
        }
        for p in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_private(p.parse().unwrap()), "{p}");
        }
    }

    #[tokio::test]
    async fn ip_literals_connect_directly_and_are_guarded() {
        let name = ServerName::parse("127.0.0.1:8448").unwrap();
        assert!(matches!(
            d(false, &[]).resolve(&name).await,
            Err(DiscoveryError::Forbidden(_))
        ));
        let ep = d(true, &[]).resolve(&name).await.unwrap();
        assert_eq!(ep.authority, "127.0.0.1:8448");
        let ep = d(true, &[])
            .resolve(&ServerName::parse("[::1]").unwrap())
            .await
            .unwrap();
        assert_eq!(ep.authority, "[::1]:8448");
        let ep = d(false, &[])
            .resolve(&ServerName::parse("8.8.8.8").unwrap())
            .await
            .unwrap();
        assert_eq!(ep.authority, "8.8.8.8:8448");
    }

    #[tokio::test]
    async fn explicit_port_skips_delegation() {
        let ep = d(false, &[])
            .resolve(&ServerName::parse("example.org:443").unwrap())
            .await
            .unwrap();
        assert_eq!(
            ep,
            Endpoint {
                authority: "example.org:443".into(),
                host_header: None
            }
        );
    }

    #[tokio::test]
    async fn overrides_win_and_keep_the_host_header() {
        let o = [("example.org", "10.0.0.5:8448")];
        let ep = d(true, &o)
            .resolve(&ServerName::parse("example.org").unwrap())
            .await
            .unwrap();
        assert_eq!(ep.authority, "10.0.0.5:8448");
        assert_eq!(ep.host_header.as_deref(), Some("example.org"));
        assert!(
            d(false, &o)
                .resolve(&ServerName::parse("example.org").unwrap())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn resolver_refuses_private_addresses() {
        use reqwest::dns::Resolve;
        let disc = d(false, &[]);
        disc.pins
            .lock()
            .unwrap()
            .insert("evil.test".into(), vec!["127.0.0.1:443".parse().unwrap()]);
        let name: reqwest::dns::Name = "evil.test".parse().unwrap();
        assert!(disc.resolver().resolve(name).await.is_err());
        let disc = d(true, &[]);
        disc.pins
            .lock()
            .unwrap()
            .insert("ok.test".into(), vec!["127.0.0.1:443".parse().unwrap()]);
        let name: reqwest::dns::Name = "ok.test".parse().unwrap();
        assert_eq!(disc.resolver().resolve(name).await.unwrap().count(), 1);
    }

    #[test]
    fn cache_control() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("cache-control", "public, max-age=60".parse().unwrap());
        assert_eq!(cache_ttl(&h), Some(Duration::from_secs(60)));
        h.insert("cache-control", "max-age=99999999".parse().unwrap());
        assert_eq!(cache_ttl(&h), Some(WELL_KNOWN_MAX_TTL));
    }
}
