//! Timed wake-ups: one task holds every pending "try this queue again at T".
//!
//! Owns a min-heap of `(instant, key)` fed through a channel; when an instant passes,
//! it calls `wake(key)`. The federation sender and offload mode's relay each run one,
//! so a thousand backed-off queues cost a thousand heap entries, not a thousand
//! sleeping tasks. It never decides when to retry (callers compute the instant) and
//! never does I/O itself.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// Runs until every sender of `rx` is gone, calling `wake` for each entry that is due.
pub async fn run<K: Ord>(mut rx: mpsc::UnboundedReceiver<(Instant, K)>, wake: impl Fn(K)) {
    let mut heap: BinaryHeap<Reverse<(Instant, K)>> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(entry) => heap.push(Reverse(entry)),
                None => return,
            },
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                    let Reverse((_, key)) = heap.pop().expect("peeked");
                    wake(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_in_time_order_not_arrival_order() {
        let (tx, rx) = mpsc::unbounded_channel();
        let woken: Arc<Mutex<Vec<&str>>> = Arc::default();
        let w = woken.clone();
        let task = tokio::spawn(run(rx, move |k| w.lock().unwrap().push(k)));
        let t0 = Instant::now();
        tx.send((t0 + Duration::from_millis(300), "late")).unwrap();
        tx.send((t0 + Duration::from_millis(100), "early")).unwrap();
        tx.send((t0, "now")).unwrap();
        while woken.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*woken.lock().unwrap(), vec!["now", "early", "late"]);
        drop(tx);
        task.await.unwrap();
    }
}
