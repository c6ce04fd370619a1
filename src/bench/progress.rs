//! The progress line of `courier bench`, redrawn on stderr a few times a second while
//! stderr is a terminal (nothing at all otherwise, e.g. under a test or a script).
//!
//! Owns only drawing. It never writes to stdout (which carries the table and the JSON
//! line alone) and never influences what is measured.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::driver::Shared;

const WIDTH: usize = 28;

/// What the line shows next to the counters.
#[derive(Debug, Clone)]
pub struct Phase {
    pub label: String,
    /// Total for the bar (sent messages while sending, deliveries while draining).
    pub goal: Goal,
}

#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// A known count of sent messages.
    Sent(u64),
    /// Sending until an instant.
    Until(Instant, Duration),
    /// A known count of deliveries.
    Delivered(u64),
    /// No bar.
    None,
}

/// A running progress line; `finish` (or drop) erases it.
pub struct Progress {
    phase: Arc<Mutex<Phase>>,
    task: Option<tokio::task::JoinHandle<()>>,
    enabled: bool,
}

impl Progress {
    pub fn start(name: &str, shared: Arc<Shared>) -> Progress {
        let enabled = std::io::stderr().is_terminal();
        let phase = Arc::new(Mutex::new(Phase {
            label: "starting".into(),
            goal: Goal::None,
        }));
        let task = enabled.then(|| tokio::spawn(draw_loop(name.to_owned(), shared, phase.clone())));
        Progress {
            phase,
            task,
            enabled,
        }
    }

    pub fn set(&self, label: &str, goal: Goal) {
        if let Ok(mut p) = self.phase.lock() {
            *p = Phase {
                label: label.to_owned(),
                goal,
            };
        }
    }

    /// A one-line note above the progress line (stderr only).
    pub fn note(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.enabled {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{text}");
    }

    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn draw_loop(name: String, shared: Arc<Shared>, phase: Arc<Mutex<Phase>>) {
    let mut last = (Instant::now(), 0u64);
    let mut rate = 0.0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(p) = phase.lock().map(|p| p.clone()) else {
            return;
        };
        let sent = shared.sent.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64();
        if dt >= 1.0 {
            rate = delivered.saturating_sub(last.1) as f64 / dt;
            last = (now, delivered);
        }
        let fraction = match p.goal {
            Goal::Sent(n) if n > 0 => Some(sent as f64 / n as f64),
            Goal::Delivered(n) if n > 0 => Some(delivered as f64 / n as f64),
            Goal::Until(end, len) if !len.is_zero() => {
                let left = end.saturating_duration_since(now).as_secs_f64();
                Some(1.0 - left / len.as_secs_f64())
            }
            _ => None,
        };
        let bar = match fraction {
            Some(f) => {
                let filled = ((f.clamp(0.0, 1.0) * WIDTH as f64) as usize).min(WIDTH);
                format!("[{}{}] ", "#".repeat(filled), "-".repeat(WIDTH - filled))
            }
            None => String::new(),
        };
        let _ = write!(
            std::io::stderr(),
            "\r\x1b[2K{name} {}: {bar}sent {sent}, delivered {delivered}, {rate:.0} msgs/s",
            p.label
        );
    }
}
