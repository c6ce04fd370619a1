//! Matrix identifiers that courier checks at its edges: server names and user IDs.
//!
//! Owns the grammar (the spec's appendix "Identifier Grammar"), nothing else. Types
//! here are validated once, at parse time; code holding one may rely on its shape.
//! This module must never allocate on a failed parse beyond the error, nor panic.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`{0}` is not a valid server name (host or host:port)")]
    ServerName(String),
    #[error("`{0}` is not a valid user ID (@localpart:server_name)")]
    UserId(String),
}

/// A server name: `host` or `host:port`, host being a DNS name, IPv4 or `[IPv6]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerName(String);

impl ServerName {
    pub fn parse(s: &str) -> Result<ServerName, IdError> {
        let fail = || IdError::ServerName(s.to_owned());
        if s.is_empty() || s.len() > 255 {
            return Err(fail());
        }
        let (host, port) = split_host_port(s).ok_or_else(fail)?;
        if let Some(p) = port
            && p == 0
        {
            return Err(fail());
        }
        if let Some(v6) = host.strip_prefix('[') {
            let inner = v6.strip_suffix(']').ok_or_else(fail)?;
            inner.parse::<std::net::Ipv6Addr>().map_err(|_| fail())?;
        } else if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(fail());
        }
        Ok(ServerName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part without port (IPv6 keeps its brackets).
    pub fn host(&self) -> &str {
        split_host_port(&self.0).map(|(h, _)| h).unwrap_or(&self.0)
    }

    /// The explicit port, if any.
    pub fn port(&self) -> Option<u16> {
        split_host_port(&self.0).and_then(|(_, p)| p)
    }

    /// True when the host is an IP literal.
    pub fn is_ip_literal(&self) -> bool {
        let h = self.host();
        h.starts_with('[') || h.parse::<std::net::Ipv4Addr>().is_ok()
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServerName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ServerName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Splits `host[:port]` (host may be `[v6]`); `None` when the port is not a number.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        return match rest.strip_prefix(':') {
            None if rest.is_empty() => Some((host, None)),
            None => None,
            Some(p) => Some((host, Some(parse_port(p)?))),
        };
    }
    match s.rsplit_once(':') {
        None => Some((s, None)),
        Some((h, p)) => Some((h, Some(parse_port(p)?))),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// A user ID `@localpart:server_name`, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId {
    full: String,
    colon: usize,
}

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, IdError> {
        let fail = || IdError::UserId(s.to_owned());
        if s.len() > 255 || !s.starts_with('@') {
            return Err(fail());
        }
        let colon = s.find(':').ok_or_else(fail)?;
        let local = &s[1..colon];
        // Historical user IDs allow any printable ASCII but ':' in the localpart.
        if local.is_empty() || !local.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(fail());
        }
        ServerName::parse(&s[colon + 1..]).map_err(|_| fail())?;
        Ok(UserId {
            full: s.to_owned(),
            colon,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn localpart(&self) -> &str {
        &self.full[1..self.colon]
    }

    pub fn server_name(&self) -> &str {
        &self.full[self.colon + 1..]
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// A device ID: any non-empty string of printable characters, at most 255 bytes.
pub fn valid_device_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in [
            "example.org",
            "example.org:8448",
            "127.0.0.1",
            "127.0.0.1:8448",
            "[::1]",
            "[::1]:8448",
            "localhost:1",
        ] {
            assert!(ServerName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ":8448",
            "example.org:",
            "example.org:99999",
            "example.org:0",
            "exa mple.org",
            "[::1",
            "[nothex]:1",
            "a/b",
        ] {
            assert!(ServerName::parse(bad).is_err(), "{bad}");
        }
        let n = ServerName::parse("[::1]:8448").unwrap();
        assert_eq!((n.host(), n.port()), ("[::1]", Some(8448)));
        assert!(n.is_ip_literal());
        assert!(!ServerName::parse("example.org").unwrap().is_ip_literal());
        assert!(ServerName::parse("10.1.2.3").unwrap().is_ip_literal());
    }

    #[test]
    fn user_ids() {
        let u = UserId::parse("@bob:127.0.0.1:8448").unwrap();
        assert_eq!(u.localpart(), "bob");
        assert_eq!(u.server_name(), "127.0.0.1:8448");
        for bad in ["bob:x", "@:x", "@bob", "@bob:", "@b ob:x", "@bob:bad name"] {
            assert!(UserId::parse(bad).is_err(), "{bad}");
        }
        assert!(UserId::parse(&format!("@{}:x", "a".repeat(260))).is_err());
    }
}
