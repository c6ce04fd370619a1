//! Prometheus metrics: the process-wide recorder and `GET /metrics`.
//!
//! Counters and latency histograms are recorded where things happen, with the
//! `metrics` macros (`courier_*_total`, `courier_*_seconds`); this module only
//! installs the recorder once per process, folds recorded latencies into their
//! summaries every few seconds ([`upkeep`]: without it they would pile up in memory
//! between scrapes), and renders it, on listeners with the `admin` resource, behind
//! the admin token.

use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::app::App;
use crate::client::admin::Admin;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (first call only; later calls and failures are harmless).
pub fn install() {
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().ok());
}

/// How often recorded latencies are folded into their summaries.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs forever: folds the samples recorded since the last pass into the summaries
/// (`/metrics` shows quantiles over a rolling window), so memory stays bounded
/// whether or not anyone scrapes.
pub async fn upkeep() {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tick.tick().await;
        if let Some(Some(h)) = HANDLE.get() {
            h.run_upkeep();
        }
    }
}

pub fn router() -> Router<App> {
    Router::new().route("/metrics", get(render))
}

async fn render(_: Admin) -> String {
    match HANDLE.get() {
        Some(Some(h)) => h.render(),
        _ => String::new(),
    }
}
