//! A full disk: courier answers 5xx and acknowledges nothing that is not on disk.
//!
//! Puts a courier's data folder on a small tmpfs (needs root to mount; skips with a
//! message otherwise), fills it, and checks that `sendToDevice` fails with a 5xx
//! instead of a 200, that the server stays up, and that after space is freed and the
//! server restarted, what was refused is not delivered while what was accepted is.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Courier;
use common::matrix::{device, sync_until};
use serde_json::json;

fn mount_tmpfs(path: &std::path::Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_gets_5xx_and_acknowledges_nothing() {
    let mut c = Courier::start().await;
    let bob_id = format!("@bob:{}", c.server_name);
    let bob = device(&c, &bob_id, "BOB").await;
    c.kill();
    // Move the data folder onto a 64 MiB tmpfs.
    let data = c.data_dir();
    let saved = c.dir.path().join("data.saved");
    std::fs::rename(&data, &saved).unwrap();
    std::fs::create_dir(&data).unwrap();
    if !mount_tmpfs(&data, "64m") {
        eprintln!(
            "SKIPPED a_full_disk_gets_5xx_and_acknowledges_nothing: cannot mount a tmpfs (not root?)"
        );
        return;
    }
    let _unmount = Unmount(data.clone());
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", saved.display()))
        .arg(&data)
        .status()
        .unwrap();
    assert!(copied.success());
    c.spawn().await;

    let send = |txn: &'static str, n: u64| {
        let url = c.url(&format!("/_matrix/client/v3/sendToDevice/m.test/{txn}"));
        let bob = bob.clone();
        let to = bob_id.clone();
        async move {
            common::insecure_client()
                .put(url)
                .bearer_auth(bob)
                .json(&json!({"messages": {to: {"BOB": {"n": n}}}}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(send("ok", 0).await, 200);
    // Fill the disk.
    let filler = data.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // RocksDB preallocates its write-ahead log (about the memtable size ahead), so
    // writes that fit in space reserved before the disk filled are really on disk and
    // may be acknowledged; once that space is used up, writes must fail. Send until
    // they do: every 200 must be delivered later, nothing refused may be.
    let big = "x".repeat(60 * 1024);
    let mut accepted = vec![0u64];
    let mut refused = 0;
    for i in 0..1000u64 {
        let url = c.url(&format!("/_matrix/client/v3/sendToDevice/m.test/full{i}"));
        let status = common::insecure_client()
            .put(url)
            .bearer_auth(&bob)
            .json(&json!({"messages": {&bob_id: {"BOB": {"n": 1000 + i, "pad": big}}}}))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            assert_eq!(refused, 0, "a write was acknowledged after one was refused");
            accepted.push(1000 + i);
        } else if (500..600).contains(&status) {
            refused += 1;
            if refused == 5 {
                break;
            }
        }
    }
    assert!(refused > 0, "no 5xx on a full disk");
    assert!(!c.log().contains("panicked"));
    // Free the space and restart: the refused messages are not there, the accepted ones are.
    std::fs::remove_file(&filler).unwrap();
    c.kill();
    c.spawn().await;
    let seen = sync_until(&c.base(), &bob, accepted.len(), Duration::from_secs(10)).await;
    assert_eq!(seen, accepted);
    let more = sync_until(&c.base(), &bob, 1, Duration::from_secs(2)).await;
    assert!(more.is_empty(), "{more:?}");
    c.kill();
}
