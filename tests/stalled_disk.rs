//! A stalled disk: a sender that gives up while its request's write waits for the
//! disk, and sends the same request again, gets it delivered once.
//!
//! Puts a courier's data folder on a small ext4 image (a loop mount: needs root;
//! skips with a message otherwise) and freezes that file system (`fsfreeze`), so
//! every write blocks while reads go on. A client's `sendToDevice` and a peer's
//! `/send` are each sent, abandoned after a second (the connection closes), and sent
//! again while the first write is still waiting. Once the disk thaws, the recipient
//! must see each message exactly once: a retry may not pass the idempotency checks
//! while the first attempt's markers are not yet written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Courier;
use common::matrix::{device, edu, sync_until, txn};
use common::proxy::FakeOrigin;
use serde_json::json;

/// The mount and the freeze, undone on drop even when an assertion fails.
struct Frozen {
    mount: PathBuf,
}

impl Frozen {
    /// Mounts a fresh ext4 image of `image` on `mount`; `None` if this machine
    /// cannot (not root, no loop devices).
    fn mount(image: &Path, mount: &Path) -> Option<Frozen> {
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        if !ok(Command::new("truncate").arg("-s").arg("128M").arg(image))
            || !ok(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(image))
            || !ok(Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(image)
                .arg(mount))
        {
            return None;
        }
        Some(Frozen {
            mount: mount.to_owned(),
        })
    }

    fn freeze(&self, on: bool) {
        let flag = if on { "--freeze" } else { "--unfreeze" };
        let done = Command::new("fsfreeze").arg(flag).arg(&self.mount).status();
        assert!(done.is_ok_and(|s| s.success()), "fsfreeze {flag}");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.mount)
            .output();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// A client whose requests give up after a second.
fn impatient() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_retry_while_the_first_write_waits_for_the_disk_is_delivered_once() {
    let mut c = Courier::start().await;
    let bob_id = format!("@bob:{}", c.server_name);
    let bob = device(&c, &bob_id, "BOB").await;
    let alice_id = format!("@alice:{}", c.server_name);
    let alice = device(&c, &alice_id, "ALICE").await;
    c.kill();
    let data = c.data_dir();
    let saved = c.dir.path().join("data.saved");
    std::fs::rename(&data, &saved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let Some(disk) = Frozen::mount(&c.dir.path().join("disk.img"), &data) else {
        eprintln!(
            "SKIPPED a_retry_while_the_first_write_waits_for_the_disk_is_delivered_once: \
             cannot loop-mount an ext4 image (not root?)"
        );
        return;
    };
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", saved.display()))
        .arg(&data)
        .status()
        .unwrap();
    assert!(copied.success());
    c.spawn().await;

    // The peer's keys are fetched and stored now, while the disk still writes.
    let origin = FakeOrigin::start().await;
    let s = origin.signer();
    let remote = format!("@carol:{}", origin.name);
    let warm = txn(&s.origin, vec![edu(&remote, "m0", &bob_id, 0)]);
    assert_eq!(s.put_txn(&c, "T0", &warm).await.0, 200);

    let send = || {
        impatient()
            .put(c.url("/_matrix/client/v3/sendToDevice/m.test/c1"))
            .bearer_auth(&alice)
            .json(&json!({"messages": {&bob_id: {"BOB": {"n": 1}}}}))
            .send()
    };
    let body = txn(&s.origin, vec![edu(&remote, "m2", &bob_id, 2)]);
    let uri = "/_matrix/federation/v1/send/T2";
    let put = || {
        impatient()
            .put(c.url(uri))
            .header(
                "Authorization",
                s.header("PUT", uri, &c.server_name, Some(&body)),
            )
            .json(&body)
            .send()
    };

    disk.freeze(true);
    // Each first attempt waits for the frozen disk and is abandoned; each retry
    // arrives while that write is still queued.
    for attempt in 0..3 {
        let sent = send().await;
        let put = put().await;
        assert!(
            sent.as_ref().map_or(true, |r| r.status() != 200),
            "attempt {attempt}: sendToDevice answered 200 before its write was on disk"
        );
        assert!(
            put.as_ref().map_or(true, |r| r.status() != 200),
            "attempt {attempt}: /send answered 200 before its write was on disk"
        );
    }
    disk.freeze(false);

    // The senders retry once more, as they would, and now get their 200s. A /send
    // retried while the abandoned attempt's write is still finishing is answered 429
    // "too many concurrent transactions" (as Synapse answers it), which a sender
    // meets by retrying a moment later.
    assert_eq!(send().await.unwrap().status(), 200);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut status = put().await.unwrap().status();
    while status == 429 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = put().await.unwrap().status();
    }
    assert_eq!(status, 200);
    let got = sync_until(&c.base(), &bob, 4, Duration::from_secs(5)).await;
    let mut got = got;
    got.sort_unstable();
    assert_eq!(got, vec![0, 1, 2], "each message exactly once");
    c.kill();
    assert!(!c.log().contains("panicked"));
    drop(disk);
}
