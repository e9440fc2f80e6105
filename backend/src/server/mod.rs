//! The HTTP server: the built web app and a JSON API over the engine. Every request and response
//! body is a `shared` type. Routes live in [`routes::configure`], used by `serve` and by tests.

pub mod error;
pub mod routes;

use std::net::{IpAddr, TcpListener};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpServer};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use shared::View;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::Engine;
pub use error::ServerError;

/// Server settings (flags and environment variables of `flash-interp serve`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Generations (and sweeps) running at once.
    pub workers: usize,
    /// Requests allowed to wait for a worker; beyond that the answer is 503 with Retry-After.
    pub queue: usize,
    /// Expensive requests per minute per client IP; None: no limit (local use).
    pub rate_limit_per_minute: Option<u32>,
    /// The built web app (Trunk's dist/).
    pub dist: PathBuf,
    /// Decode maps with the final RMSNorm folded in.
    pub final_norm: bool,
    /// Bytes of identical deterministic results kept in memory.
    pub cache_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { workers: 2, queue: 8, rate_limit_per_minute: None, dist: PathBuf::from("dist"), final_norm: false, cache_bytes: 64 << 20 }
    }
}

/// A model the server serves, with its stable id and a sorted vocabulary for suggestions.
pub struct Served {
    pub id: String,
    pub engine: Arc<Engine>,
    /// (token text, id), sorted by text.
    pub vocab: Vec<(String, u32)>,
}

/// The bounded generation queue: `workers` permits, at most `queue` waiters.
pub struct WorkQueue {
    sem: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

impl WorkQueue {
    pub fn new(workers: usize, max_waiting: usize) -> Self {
        Self { sem: Arc::new(Semaphore::new(workers.max(1))), waiting: AtomicUsize::new(0), max_waiting }
    }
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
    /// A worker permit, waiting in the queue if there is room; `Busy` when there is none.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ServerError> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        /// Leaves the queue when dropped, also if the waiting request is dropped mid-wait.
        struct InQueue<'a>(&'a AtomicUsize);
        impl Drop for InQueue<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ServerError::Busy);
        }
        let _in_queue = InQueue(&self.waiting);
        self.sem.clone().acquire_owned().await.map_err(|e| ServerError::Internal(e.to_string()))
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub tokens: IntCounter,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("flash_interp_requests_total", "HTTP requests"), &["endpoint", "status"]).unwrap();
        let latency = HistogramVec::new(HistogramOpts::new("flash_interp_request_seconds", "Request latency"), &["endpoint"]).unwrap();
        let queue_depth = IntGauge::new("flash_interp_queue_depth", "Requests waiting for a worker").unwrap();
        let running = IntGauge::new("flash_interp_generations_running", "Generations and sweeps running").unwrap();
        let tokens = IntCounter::new("flash_interp_tokens_generated_total", "Tokens generated").unwrap();
        for c in [Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>, Box::new(latency.clone()), Box::new(queue_depth.clone()), Box::new(running.clone()), Box::new(tokens.clone())] {
            registry.register(c).unwrap();
        }
        Self { registry, requests, latency, queue_depth, running, tokens }
    }
}

/// A bounded in-memory cache of identical deterministic results (search, neuron detail, sweeps,
/// seeded generations), by total bytes.
pub struct ResultCache {
    lru: Mutex<lru::LruCache<String, Arc<Vec<u8>>>>,
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl ResultCache {
    fn new(max_bytes: usize) -> Self {
        Self { lru: Mutex::new(lru::LruCache::unbounded()), bytes: AtomicUsize::new(0), max_bytes }
    }
    pub fn get(&self, key: &str) -> Option<Arc<Vec<u8>>> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }
    pub fn put(&self, key: String, body: Vec<u8>) {
        if body.len() > self.max_bytes / 4 {
            return;
        }
        let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        self.bytes.fetch_add(body.len(), Ordering::Relaxed);
        if let Some(old) = lru.put(key, Arc::new(body)) {
            self.bytes.fetch_sub(old.len(), Ordering::Relaxed);
        }
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes {
            match lru.pop_lru() {
                Some((_, v)) => self.bytes.fetch_sub(v.len(), Ordering::Relaxed),
                None => break,
            };
        }
    }
}

pub struct AppState {
    pub models: Vec<Served>,
    pub config: ServerConfig,
    pub queue: WorkQueue,
    pub limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    pub metrics: Metrics,
    pub cache: ResultCache,
    /// Requests seen by the rate limiter, to prune its per-IP state now and then.
    pub rate_checks: AtomicUsize,
}

impl AppState {
    pub fn new(engines: Vec<Arc<Engine>>, config: ServerConfig) -> Arc<Self> {
        let mut models: Vec<Served> = Vec::new();
        for engine in engines {
            let base: String = engine
                .info
                .name
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
                .collect();
            let mut id = base.clone();
            let mut n = 2;
            while models.iter().any(|m| m.id == id) {
                id = format!("{base}-{n}");
                n += 1;
            }
            let mut vocab: Vec<(String, u32)> =
                (0..engine.tok.vocab_size() as u32).map(|i| (engine.tok.token_text(i), i)).collect();
            vocab.sort();
            models.push(Served { id, engine, vocab });
        }
        let limiter = config
            .rate_limit_per_minute
            .and_then(NonZeroU32::new)
            .map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Arc::new(Self {
            queue: WorkQueue::new(config.workers, config.queue),
            cache: ResultCache::new(config.cache_bytes),
            models,
            limiter,
            metrics: Metrics::new(),
            rate_checks: AtomicUsize::new(0),
            config,
        })
    }

    pub fn model(&self, id: &str) -> Result<&Served, ServerError> {
        self.models.iter().find(|m| m.id == id).ok_or_else(|| ServerError::UnknownModel(id.to_owned()))
    }

    /// Build the up-view maps in the background so the first search does not wait.
    pub fn warm_maps(self: &Arc<Self>) {
        for i in 0..self.models.len() {
            let state = self.clone();
            std::thread::spawn(move || {
                let m = &state.models[i];
                match m.engine.map(View::Up, state.config.final_norm, &|_, _| {}) {
                    Ok(_) => tracing::info!("neuron map of {} ready", m.id),
                    Err(e) => tracing::warn!("building the neuron map of {}: {e}", m.id),
                }
            });
        }
    }
}

/// Bind `addr` and run the server until it is stopped (SIGINT/SIGTERM shut it down gracefully).
pub async fn serve(state: Arc<AppState>, listener: TcpListener) -> std::io::Result<()> {
    let data = web::Data::from(state);
    HttpServer::new(move || App::new().app_data(data.clone()).configure(routes::configure))
        .listen(listener)?
        .shutdown_timeout(10)
        .run()
        .await
}
