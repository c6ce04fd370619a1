//! Issue 2 as a user tries it: the binary's CLI, config refusal, the key server over
//! HTTPS, remote key fetching and caching, graceful shutdown.

mod common;

use common::{Courier, run_cli};
use serde_json::Value;

fn ruma_verifies(server: &str, key_id: &str, key_b64: &str, obj: &Value) -> bool {
    use ruma_common::serde::Base64;
    let mut set = std::collections::BTreeMap::new();
    set.insert(key_id.to_owned(), Base64::parse(key_b64).unwrap());
    let mut map = ruma_signatures::PublicKeyMap::new();
    map.insert(server.to_owned(), set);
    let canon =
        ruma_common::canonical_json::try_from_json_map(obj.as_object().unwrap().clone()).unwrap();
    ruma_signatures::verify_json(&map, &canon).is_ok()
}

#[tokio::test]
async fn key_server_publishes_a_key_that_matches_the_file_and_verifies_elsewhere() {
    let c = Courier::start().await;
    // The key was generated on first start, in Synapse's format.
    let key_file = std::fs::read_to_string(c.dir.path().join("keys/signing.key")).unwrap();
    let parts: Vec<&str> = key_file.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{key_file}");
    assert_eq!(parts[0], "ed25519");
    let key_id = format!("ed25519:{}", parts[1]);

    // Fetched over HTTPS, pinning the generated certificate.
    let resp = c
        .pinned_client()
        .get(c.url("/_matrix/key/v2/server"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["server_name"], c.server_name.as_str());
    let published = body["verify_keys"][&key_id]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let from_file = courier::signing::keyfile::read(c.dir.path().join("keys/signing.key")).unwrap();
    assert_eq!(published, from_file.public_key_base64());
    let now = courier::store::now_ms();
    let until = body["valid_until_ts"].as_u64().unwrap();
    assert!(until > now + 6 * 86_400_000 && until <= now + 7 * 86_400_000 + 60_000);
    assert!(body["old_verify_keys"].is_object());

    // Another implementation accepts the self-signature, and refuses a tampered copy.
    assert!(ruma_verifies(&c.server_name, &key_id, &published, &body));
    let mut tampered = body.clone();
    tampered["valid_until_ts"] = Value::from(until + 1);
    assert!(!ruma_verifies(
        &c.server_name,
        &key_id,
        &published,
        &tampered
    ));
}

#[tokio::test]
async fn a_restart_keeps_the_same_key() {
    let mut c = Courier::start().await;
    let get = |c: &Courier| {
        let client = c.pinned_client();
        let url = c.url("/_matrix/key/v2/server");
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let before = get(&c).await["verify_keys"].clone();
    assert_eq!(c.terminate(), Some(0), "SIGTERM exits 0; log:\n{}", c.log());
    c.spawn().await;
    assert_eq!(get(&c).await["verify_keys"], before);
}

#[tokio::test]
async fn version_and_unknown_endpoints() {
    let c = Courier::start().await;
    let client = c.pinned_client();
    let v: Value = client
        .get(c.url("/_matrix/federation/v1/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["server"]["name"], "courier");
    let r = client
        .get(c.url("/_matrix/federation/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["errcode"], "M_UNRECOGNIZED");
}

#[tokio::test]
async fn remote_keys_are_fetched_checked_and_cached_across_restarts() {
    use courier::federation::{client::FederationClient, keys::RemoteKeys};
    courier::tls::install_crypto_provider();
    let mut remote = Courier::start().await;
    let remote_name = courier::ids::ServerName::parse(&remote.server_name).unwrap();
    let key_file =
        courier::signing::keyfile::read(remote.dir.path().join("keys/signing.key")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let fed = courier::config::Federation {
        allow_private_destinations: true,
        verify_certificates: false,
        ..Default::default()
    };
    let me = courier::ids::ServerName::parse("127.0.0.1:1").unwrap();
    let key = std::sync::Arc::new(courier::signing::SigningKey::generate("t").unwrap());
    let open = || {
        let store = courier::store::Store::open(dir.path(), &Default::default()).unwrap();
        let client =
            std::sync::Arc::new(FederationClient::new(me.clone(), key.clone(), &fed).unwrap());
        RemoteKeys::new(store, client)
    };
    {
        let keys = open();
        let k = keys.get(&remote_name, &key_file.key_id()).await.unwrap();
        assert_eq!(k, key_file.verifying_key());
        // An unknown key id is an error, not a panic, and does not hammer the server.
        assert!(keys.get(&remote_name, "ed25519:nope").await.is_err());
    }
    // The remote goes away; a fresh process still knows its key from the store.
    remote.kill();
    let keys = open();
    let k = keys.get(&remote_name, &key_file.key_id()).await.unwrap();
    assert_eq!(k, key_file.verifying_key());
}

#[test]
fn keygen_writes_synapse_format_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = run_cli(&["keygen", "--out", "k/signing.key"], "", dir.path());
    assert_eq!(code, 0, "{err}");
    let key_id = out.trim();
    assert!(key_id.starts_with("ed25519:"), "{out}");
    let text = std::fs::read_to_string(dir.path().join("k/signing.key")).unwrap();
    let parts: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(format!("{}:{}", parts[0], parts[1]), key_id);
    assert_eq!(parts[2].len(), 43, "unpadded base64 of 32 bytes");
    let (code, out, err) = run_cli(&["keygen", "--out", "k/signing.key"], "", dir.path());
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("k/signing.key")).unwrap(),
        text
    );
}

#[test]
fn json_canonical_follows_the_spec_and_refuses_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let ok = |input: &str, want: &str| {
        let (code, out, err) = run_cli(&["json", "canonical"], input, d.path());
        assert_eq!(code, 0, "{input}: {err}");
        assert_eq!(out, format!("{want}\n"), "{input}");
    };
    ok(r#"{"b": "2", "a": "1"}"#, r#"{"a":"1","b":"2"}"#);
    ok(r#"{"a": -0, "b": 1e10}"#, r#"{"a":0,"b":10000000000}"#);
    ok(r#"{"本": 2, "日": 1}"#, r#"{"日":1,"本":2}"#);
    ok(r#"{"a": "\u65E5"}"#, r#"{"a":"日"}"#);
    for bad in [
        "{",
        r#"{"a": 1} x"#,
        r#"{"a": 1, "a": 2}"#,
        r#"{"a": "\ud800"}"#,
        r#"{"a": 1.5}"#,
        r#"{"a": 9007199254740992}"#,
        "",
    ] {
        let (code, out, err) = run_cli(&["json", "canonical"], bad, d.path());
        assert_ne!(code, 0, "{bad} must be refused");
        assert!(out.is_empty(), "{bad}: {out}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{bad}: one-line error, got {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn json_sign_matches_the_spec_vector() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("k"),
        "ed25519 1 YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(
        &["json", "sign", "--key", "k", "--server-name", "domain"],
        r#"{"one": 1, "two": "Two"}"#,
        d.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        r#"{"one":1,"signatures":{"domain":{"ed25519:1":"KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"}},"two":"Two"}"#
    );
    let (code, _, _) = run_cli(
        &["json", "sign", "--key", "k", "--server-name", "domain"],
        "[1]",
        d.path(),
    );
    assert_ne!(code, 0, "arrays cannot be signed");
}

#[test]
fn bad_config_is_refused_naming_the_field() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("c.toml"),
        "server_name = \"x\"\ndata_dir = \"d\"\nsigning_key = \"k\"\nbogus = 1\n[[listeners]]\naddress = \"127.0.0.1:1\"\nresources = [\"client\"]\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", "c.toml"], "", d.path());
    assert_ne!(code, 0);
    assert!(err.contains("bogus"), "{err}");
    let (code, _, err) = run_cli(&["serve", "--config", "missing.toml"], "", d.path());
    assert_ne!(code, 0);
    assert!(err.contains("missing.toml"), "{err}");
}

/// The `THP_enabled` line of a process's `/proc/<pid>/status` (Linux 5.0+).
fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
}

/// Restarts `c` with its command changed by `set`; the new process's pid.
async fn respawn_with(c: &mut Courier, set: impl FnOnce(&mut std::process::Command)) -> u32 {
    c.kill();
    c.try_spawn_with(set).await.unwrap();
    c.pid().unwrap()
}

#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages_unless_the_operator_says() {
    let mut c = Courier::start().await;
    let Some(ours) = thp_enabled(std::process::id()) else {
        eprintln!("skipped: this kernel's /proc/<pid>/status has no THP_enabled line");
        return;
    };
    if ours != "1" {
        eprintln!(
            "skipped: this test process runs with huge pages already off, which its children inherit"
        );
        return;
    }
    let pid = respawn_with(&mut c, |cmd| {
        cmd.env_remove(courier::memory::OPERATOR_SETTING);
    })
    .await;
    assert_eq!(thp_enabled(pid).as_deref(), Some("0"), "log:\n{}", c.log());
    // The operator's setting wins: mimalloc applies it, courier leaves it alone.
    let pid = respawn_with(&mut c, |cmd| {
        cmd.env(courier::memory::OPERATOR_SETTING, "1");
    })
    .await;
    assert_eq!(thp_enabled(pid).as_deref(), Some("1"), "log:\n{}", c.log());
    assert!(
        c.log().contains("MIMALLOC_ALLOW_THP=1"),
        "log:\n{}",
        c.log()
    );
}

#[tokio::test]
async fn the_listener_queues_up_to_1024_connections_for_a_burst() {
    let c = Courier::start().await;
    // `ss` shows a listening socket's backlog as its Send-Q.
    let out = match std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", c.port)])
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("skipped: `ss` (iproute2) is not available to read the listener's backlog");
            return;
        }
    };
    let backlog: usize = out
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listener on port {} in `ss` output: {out:?}", c.port));
    let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(usize::MAX);
    // The standard library's 128 overflowed with 256 clients connecting at once.
    assert_eq!(backlog, 1024.min(cap), "{out}");
}

/// `(soft, hard)` "Max open files" of a process, from `/proc/<pid>/limits`.
fn open_file_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

#[tokio::test]
async fn the_server_raises_its_open_file_limit_to_the_hard_limit() {
    use std::os::unix::process::CommandExt;
    let mut c = Courier::start().await;
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_some_and(|h| h <= 256) {
        eprintln!("skipped: the hard open-file limit ({hard:?}) leaves nothing to raise");
        return;
    }
    // Started as a shell commonly starts it: a soft limit far below the hard one.
    let pid = respawn_with(&mut c, |cmd| unsafe {
        cmd.pre_exec(move || {
            let low = rustix::process::Rlimit {
                current: Some(256),
                maximum: hard,
            };
            rustix::process::setrlimit(rustix::process::Resource::Nofile, low)
                .map_err(std::io::Error::from)
        });
    })
    .await;
    let (soft, hard_seen) = open_file_limits(pid).expect("/proc/<pid>/limits");
    assert_ne!(soft, "256", "log:\n{}", c.log());
    assert_eq!(soft, hard_seen, "log:\n{}", c.log());
    assert!(
        c.log().contains("raised the open-file limit"),
        "log:\n{}",
        c.log()
    );
}
