//! Prometheus metrics: the process-wide recorder and `GET /metrics`.
//!
//! Counters are recorded where things happen, with the `metrics` macros
//! (`courier_*_total`); this module only installs the recorder once per process and
//! renders it, on listeners with the `admin` resource, behind the admin token.

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

pub fn router() -> Router<App> {
    Router::new().route("/metrics", get(render))
}

async fn render(_: Admin) -> String {
    match HANDLE.get() {
        Some(Some(h)) => h.render(),
        _ => String::new(),
    }
}
