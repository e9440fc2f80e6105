//! Neuron maps for the server: built in the background, one at a time, each build holding a worker
//! permit like any other expensive work (so it is bounded and visible in `/metrics`), on a thread
//! pool of its own (so requests that use a ready map never queue behind a build's tasks). A request
//! that needs a map that is not ready gets 503 with Retry-After and the build's progress, and the
//! build is scheduled if it was not already. `serve` schedules every view of every model at start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntGauge, IntGaugeVec};
use shared::View;
use tokio::sync::{mpsc, Semaphore};

use super::ServerError;
use crate::engine::Engine;
use crate::map::NeuronMap;

/// A map wanted by the server: which model (by id) and view.
#[derive(Clone)]
struct Job {
    model: String,
    engine: Arc<Engine>,
    view: View,
    final_norm: bool,
}

/// Progress of a build in thousandths, or [`QUEUED`] while it waits for a worker.
type Progress = Arc<AtomicUsize>;
const QUEUED: usize = usize::MAX;
/// A map's key in the builder: (model id, view).
type Key = (String, View);
type Pending = Arc<Mutex<HashMap<Key, Progress>>>;
/// Failed builds: why, and when.
type Failures = Arc<Mutex<HashMap<Key, (String, Instant)>>>;

pub struct MapBuilds {
    tx: mpsc::UnboundedSender<Job>,
    /// Builds queued or running, by (model id, view), with their progress.
    pending: Pending,
    /// Builds that failed, with why and when: answered as an error (not "building") for
    /// [`RETRY_FAILED`], then tried again.
    failed: Failures,
    gauges: BuildGauges,
}

/// How long a failed build is reported as failed before a request schedules it again.
const RETRY_FAILED: Duration = Duration::from_secs(60);

/// The gauges a builder keeps up to date.
#[derive(Clone)]
pub struct BuildGauges {
    /// Builds waiting for a worker or running.
    pub pending: IntGauge,
    /// Builds running (each holds a worker permit).
    pub running: IntGauge,
    /// Progress (0–1000) of each model and view's build; 1000 once the map is ready.
    pub progress: IntGaugeVec,
}

impl MapBuilds {
    /// Start the builder thread. Builds take a permit of `workers` (the server's worker queue).
    pub fn new(workers: Arc<Semaphore>, gauges: BuildGauges) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let pending: Pending = Arc::default();
        let failed: Failures = Arc::default();
        let (list, failures, g) = (pending.clone(), failed.clone(), gauges.clone());
        std::thread::Builder::new()
            .name("map-builder".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().build() {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!("map builder: {e}"),
                };
                let pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("map-build-{i}")).build().ok();
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        let key = (job.model.clone(), job.view);
                        let progress = list.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned().unwrap_or_default();
                        let label = [job.model.as_str(), job.view.as_str()];
                        let Ok(permit) = workers.clone().acquire_owned().await else { break };
                        gauges.running.inc();
                        progress.store(0, Ordering::Relaxed);
                        let report = |done: usize, total: usize| {
                            let p = (done * 1000).checked_div(total).unwrap_or(0);
                            progress.store(p, Ordering::Relaxed);
                            gauges.progress.with_label_values(&label).set(p as i64);
                        };
                        let build = || job.engine.map(job.view, job.final_norm, &report);
                        // A panic in a build must not stop the builder (every later map would wait
                        // forever): it is one more failure.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &pool {
                            Some(pool) => pool.install(build),
                            None => build(),
                        }));
                        match r {
                            Ok(Ok((_, origin))) => {
                                gauges.progress.with_label_values(&label).set(1000);
                                tracing::info!("neuron map of {} ({}) ready: {origin:?}", job.model, job.view.as_str());
                            }
                            Ok(Err(e)) => {
                                tracing::error!("building the neuron map of {} ({}): {e}", job.model, job.view.as_str());
                                failures.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), (e.to_string(), Instant::now()));
                            }
                            Err(_) => {
                                tracing::error!("building the neuron map of {} ({}) panicked", job.model, job.view.as_str());
                                failures.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), ("the build panicked".into(), Instant::now()));
                            }
                        }
                        drop(permit);
                        gauges.running.dec();
                        gauges.pending.dec();
                        list.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    }
                });
            })
            .expect("spawning the map builder thread");
        Self { tx, pending, failed, gauges: g }
    }

    /// Queue a build unless the map is ready or its build is already queued.
    fn schedule(&self, job: Job) -> Progress {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let key = (job.model.clone(), job.view);
        if let Some(p) = pending.get(&key) {
            return p.clone();
        }
        let p = Progress::new(AtomicUsize::new(QUEUED));
        pending.insert(key, p.clone());
        self.gauges.pending.inc();
        if self.tx.send(job).is_err() {
            tracing::error!("the map builder has stopped");
        }
        p
    }

    /// The map of `view` if it is ready; otherwise its build is scheduled and the answer is
    /// `MapBuilding` (503 + Retry-After) with the build's progress.
    pub fn get(&self, model: &str, engine: &Arc<Engine>, view: View, final_norm: bool) -> Result<Arc<NeuronMap>, ServerError> {
        if let Some(m) = engine.map_if_ready(view, final_norm) {
            return Ok(m);
        }
        let key = (model.to_owned(), view);
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match failed.get(&key) {
            Some((why, when)) if when.elapsed() < RETRY_FAILED => {
                return Err(ServerError::Internal(format!("building the {} map of {model} failed: {why}", view.as_str())));
            }
            Some(_) => drop(failed.remove(&key)),
            None => {}
        }
        drop(failed);
        let job = Job { model: model.to_owned(), engine: engine.clone(), view, final_norm };
        let progress = self.schedule(job);
        // It may have become ready between the first look and scheduling.
        if let Some(m) = engine.map_if_ready(view, final_norm) {
            return Ok(m);
        }
        let permille = Some(progress.load(Ordering::Relaxed)).filter(|&p| p != QUEUED);
        Err(ServerError::MapBuilding { model: model.to_owned(), view, permille })
    }

    /// Schedule every view of a model (the server does this at start, so the first visitor does
    /// not wait).
    pub fn warm(&self, model: &str, engine: &Arc<Engine>, final_norm: bool) {
        for view in View::ALL {
            if !engine.map_ready(view, final_norm) {
                self.schedule(Job { model: model.to_owned(), engine: engine.clone(), view, final_norm });
            }
        }
    }
}
