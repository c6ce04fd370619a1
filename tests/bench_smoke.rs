//! `courier bench` end to end at a tiny size, through the binary: the JSON line parses,
//! every message arrived exactly once, and the documented field names are there.
//!
//! It never asserts on timings (the figures depend on the machine).

use std::process::Command;

use serde_json::Value;

const FIELDS: &[&str] = &[
    "sent",
    "delivered",
    "duplicates",
    "msgs_per_sec",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "max_rss_mib",
    "transactions_per_sec",
    "edus_per_txn",
    "wire_bytes",
    "rss_mib_a",
    "rss_mib_b",
    "cpu_seconds_a",
    "cpu_seconds_b",
    "store_bytes_a",
    "store_bytes_b",
    "scenario",
    "fanout",
];

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run courier bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "courier bench failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn check(v: &Value, scenario: &str) {
    for f in FIELDS {
        assert!(v.get(*f).is_some(), "field `{f}` missing: {v}");
    }
    assert_eq!(v["scenario"], scenario);
    let sent = v["sent"].as_u64().unwrap();
    let fanout = v["fanout"].as_u64().unwrap();
    assert!(sent > 0, "{v}");
    assert_eq!(v["delivered"].as_u64().unwrap(), sent * fanout, "{v}");
    assert_eq!(v["duplicates"].as_u64().unwrap(), 0, "{v}");
    assert!(v["transactions_per_sec"].as_f64().is_some(), "{v}");
    assert!(v["wire_bytes"].as_u64().unwrap() > 0, "{v}");
    // Everything delivered was acknowledged: nothing is left in either store
    // (many-destinations has no B store: its destinations are simulated).
    assert_eq!(v["pending_rows_a"], 0, "{v}");
    if scenario != "many-destinations" {
        assert_eq!(v["pending_rows_b"], 0, "{v}");
    }
}

#[test]
fn one_to_one_delivers_every_message_once() {
    let v = bench(&["--messages", "200", "--concurrency", "8"]);
    check(&v, "one-to-one");
    assert_eq!(v["sent"], 200);
    assert!(v.get("synapse").is_none());
}

#[test]
fn fan_out_delivers_to_every_device() {
    let v = bench(&[
        "--scenario",
        "fan-out",
        "--fanout",
        "5",
        "--messages",
        "40",
        "--concurrency",
        "4",
    ]);
    check(&v, "fan-out");
    assert_eq!(v["delivered"], 200);
}

#[test]
fn backlog_drains_after_the_destination_restarts() {
    let v = bench(&[
        "--scenario",
        "backlog",
        "--messages",
        "100",
        "--concurrency",
        "8",
    ]);
    check(&v, "backlog");
    assert!(v["drain_seconds"].as_f64().is_some(), "{v}");
    // The CPU of each process over the drain alone is reported.
    for f in [
        "drain_cpu_seconds_a",
        "drain_cpu_seconds_b",
        "drain_cpu_seconds_bench",
    ] {
        assert!(v[f].as_f64().is_some_and(|c| c >= 0.0), "{f}: {v}");
    }
}

#[test]
fn many_destinations_deliver_once_to_each() {
    let v = bench(&[
        "--scenario",
        "many-destinations",
        "--destinations",
        "20",
        "--fanout",
        "5",
        "--messages",
        "40",
        "--concurrency",
        "4",
    ]);
    check(&v, "many-destinations");
    assert_eq!(v["destinations"], 20);
    assert_eq!(v["delivered"], 200);
    assert!(v["pending_rows_b"].is_null(), "{v}");
}

#[test]
fn paced_sending_delivers_every_message_once() {
    let v = bench(&["--messages", "60", "--rate", "200", "--concurrency", "4"]);
    check(&v, "one-to-one");
    assert_eq!(v["rate"], 200.0);
}

/// Removes a kept run folder when the test ends, passed or not.
struct Cleanup(Option<std::path::PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[test]
fn keep_leaves_the_servers_folders_with_their_logs() {
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["bench", "--messages", "30", "--concurrency", "4", "--json"])
        .arg("--keep")
        .env("RUST_LOG", "info,courier=debug")
        .output()
        .expect("run courier bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let kept = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kept: "))
        .map(std::path::PathBuf::from);
    let _cleanup = Cleanup(kept.clone());
    assert!(out.status.success(), "courier bench failed: {stderr}");
    let kept = kept.unwrap_or_else(|| panic!("no `kept: <path>` line: {stderr}"));
    assert!(kept.join("A/courier.toml").is_file(), "{}", kept.display());
    // B's log names each transaction it accepted, with where its time went.
    let b_log = std::fs::read_to_string(kept.join("B/courier.log")).expect("B's log is kept");
    let accepted = b_log
        .lines()
        .find(|l| l.contains("transaction accepted"))
        .unwrap_or_else(|| panic!("no accepted transaction in B's log:\n{b_log}"));
    for field in ["auth_us=", "prepare_us=", "write_us="] {
        assert!(accepted.contains(field), "{field} missing: {accepted}");
    }
}

#[test]
fn without_keep_the_run_folder_is_removed() {
    let child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["bench", "--messages", "10", "--concurrency", "2", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run courier bench");
    // The run's folder is named after the benchmark's process.
    let prefix = format!("courier-bench-courier-{}-", child.id());
    let out = child.wait_with_output().expect("wait for courier bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "courier bench failed: {stderr}");
    assert!(!stderr.contains("kept: "), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("read the temp folder")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "run folders left behind: {left:?}");
}

#[test]
fn repeated_runs_list_every_run_and_report_a_whole_one() {
    let v = bench(&["--messages", "30", "--concurrency", "4", "--repeat", "2"]);
    check(&v, "one-to-one");
    assert_eq!(v["sent"], 30);
    let runs = v["runs_msgs_per_sec"]
        .as_array()
        .unwrap_or_else(|| panic!("no runs_msgs_per_sec: {v}"));
    assert_eq!(runs.len(), 2, "{v}");
    // The reported run is one of them.
    assert!(runs.contains(&v["msgs_per_sec"]), "{v}");
}
