//! The HTTP server: the built web app and a JSON API over the engine. Every request and response
//! body is a `shared` type. Routes live in [`routes::configure`], used by `serve` and by tests.

pub mod assets;
pub mod conn;
pub mod error;
pub mod maps;
pub mod preview;
pub mod routes;

use std::net::{IpAddr, TcpListener};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{web, App, HttpServer};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::batch::Batcher;
use crate::engine::Engine;
pub use error::ServerError;

/// Server settings (flags and environment variables of `flash-interp serve`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Generations (and sweeps) running at once.
    pub workers: usize,
    /// Requests allowed to wait for a worker; beyond that the answer is 503 with Retry-After.
    pub queue: usize,
    /// Rows (samples × variants) each model's generation batch runs at once: concurrent
    /// generations share one decoding step; a request whose rows do not fit waits in the queue.
    /// A request with more rows than this is refused (413 `over_budget`).
    pub batch_rows: usize,
    /// Expensive requests per minute per client IP; None: no limit (local use).
    pub rate_limit_per_minute: Option<u32>,
    /// The built web app (Trunk's dist/).
    pub dist: PathBuf,
    /// Decode maps with the final RMSNorm folded in.
    pub final_norm: bool,
    /// Bytes of identical deterministic results kept in memory.
    pub cache_bytes: usize,
    /// Most work one request may ask for, in FLOP-equivalents (estimated before it runs; see
    /// `Engine::forward_cost`). Larger requests are refused with 413 `over_budget`.
    pub max_request_flops: f64,
    /// Time a client has to send its whole request body.
    pub body_timeout: Duration,
    /// Key the rate limiter by the last address in `X-Forwarded-For` (the one a reverse proxy in
    /// front of this server appended) instead of the connection's peer, and link previews' site
    /// address from its Forwarded / X-Forwarded-Host / -Proto headers instead of the Host
    /// header. Only for a server that is reachable through that proxy alone: otherwise any
    /// client can pick its own key and address.
    pub trust_forwarded_for: bool,
}

/// Default per-request budget on a CPU: 2.5 T FLOP-equivalents, about 60 s of this project's
/// 2-core machine (~40 G a second) on the default model with f32 weights: the longest
/// generation the limits allow, 512 tokens of normal and steered answers, fits after a chat
/// prompt of up to ~100 tokens; a 64-value sweep at layer 0 of a 2,000-token prompt (~45 T) does
/// not.
pub const CPU_REQUEST_FLOPS: f64 = 2.5e12;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            queue: 8,
            batch_rows: 32,
            rate_limit_per_minute: None,
            dist: PathBuf::from("dist"),
            final_norm: false,
            cache_bytes: 64 << 20,
            max_request_flops: CPU_REQUEST_FLOPS,
            body_timeout: Duration::from_secs(10),
            trust_forwarded_for: false,
        }
    }
}

/// A model the server serves, with its stable id and a sorted vocabulary for suggestions.
pub struct Served {
    pub id: String,
    pub engine: Arc<Engine>,
    /// (token text, id), sorted by text.
    pub vocab: Vec<(String, u32)>,
    /// The model's generations in progress, run as one batch.
    pub batch: Batcher,
    /// Seats in that batch: a generation takes one per row while it runs.
    pub seats: WorkQueue,
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
    /// The worker permits themselves (map builds take one without queueing as a request).
    pub fn semaphore(&self) -> Arc<Semaphore> {
        self.sem.clone()
    }
    /// A worker permit, waiting in the queue if there is room; `Busy` when there is none.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ServerError> {
        self.acquire_many(1).await
    }
    /// `n` permits at once (a generation's rows in the batch), waiting as [`WorkQueue::acquire`].
    pub async fn acquire_many(&self, n: u32) -> Result<OwnedSemaphorePermit, ServerError> {
        if let Ok(p) = self.sem.clone().try_acquire_many_owned(n) {
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
        self.sem.clone().acquire_many_owned(n).await.map_err(|e| ServerError::Internal(e.to_string()))
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub tokens: IntCounter,
    /// Rows running in the models' generation batches (read when metrics are asked for).
    pub batch_rows: IntGauge,
    /// The batches' kept prompts: runs reused so far, and bytes kept now (read when asked for).
    pub prompt_hits: IntGauge,
    pub prompt_bytes: IntGauge,
    pub builds: maps::BuildGauges,
    /// Requests whose client went away while they waited or ran (their work was stopped).
    pub abandoned: IntCounter,
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(Opts::new("flash_interp_requests_total", "HTTP requests"), &["endpoint", "status"]).unwrap();
        let latency = HistogramVec::new(HistogramOpts::new("flash_interp_request_seconds", "Request latency"), &["endpoint"]).unwrap();
        let queue_depth = IntGauge::new("flash_interp_queue_depth", "Requests waiting for a worker").unwrap();
        let running = IntGauge::new("flash_interp_generations_running", "Generations and sweeps running").unwrap();
        let tokens = IntCounter::new("flash_interp_tokens_generated_total", "Tokens generated").unwrap();
        let batch_rows = IntGauge::new("flash_interp_batch_rows", "Rows (samples x variants) running in the generation batches").unwrap();
        let prompt_hits =
            IntGauge::new("flash_interp_prompt_cache_hits", "Prompt runs (one per intervention) reused from the kept prompts so far").unwrap();
        let prompt_bytes = IntGauge::new("flash_interp_prompt_cache_bytes", "Bytes of prompt runs kept for reuse").unwrap();
        let builds = maps::BuildGauges {
            pending: IntGauge::new("flash_interp_map_builds_pending", "Neuron-map builds queued or running").unwrap(),
            running: IntGauge::new("flash_interp_map_builds_running", "Neuron-map builds running (each holds a worker)").unwrap(),
            progress: IntGaugeVec::new(
                Opts::new("flash_interp_map_build_permille", "Progress of each neuron map's build, 0-1000"),
                &["model", "view"],
            )
            .unwrap(),
        };
        let abandoned = IntCounter::new(
            "flash_interp_requests_abandoned_total",
            "Requests stopped because their client went away before their answer was read to its end",
        )
        .unwrap();
        let collectors: [Box<dyn prometheus::core::Collector>; 12] = [
            Box::new(requests.clone()),
            Box::new(latency.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running.clone()),
            Box::new(tokens.clone()),
            Box::new(batch_rows.clone()),
            Box::new(prompt_hits.clone()),
            Box::new(prompt_bytes.clone()),
            Box::new(builds.pending.clone()),
            Box::new(builds.running.clone()),
            Box::new(builds.progress.clone()),
            Box::new(abandoned.clone()),
        ];
        for c in collectors {
            registry.register(c).unwrap();
        }
        Self { registry, requests, latency, queue_depth, running, tokens, batch_rows, prompt_hits, prompt_bytes, builds, abandoned }
    }
}

/// A bounded in-memory cache of identical deterministic results (search, neuron detail, sweeps,
/// seeded generations), by total bytes.
pub struct ResultCache {
    lru: Mutex<lru::LruCache<String, Bytes>>,
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl ResultCache {
    fn new(max_bytes: usize) -> Self {
        Self { lru: Mutex::new(lru::LruCache::unbounded()), bytes: AtomicUsize::new(0), max_bytes }
    }
    fn get(&self, key: &str) -> Option<Bytes> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// The body cached under `key`, or else `work`'s (a future: it starts only on a miss), which
    /// is then cached. Failures are not cached.
    pub async fn get_or(&self, key: String, work: impl std::future::Future<Output = Result<Vec<u8>, ServerError>>) -> Result<Bytes, ServerError> {
        if let Some(body) = self.get(&key) {
            return Ok(body);
        }
        let body = Bytes::from(work.await?);
        self.put(key, body.clone());
        Ok(body)
    }

    fn put(&self, key: String, body: Bytes) {
        if body.len() > self.max_bytes / 4 {
            return;
        }
        let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        self.bytes.fetch_add(body.len(), Ordering::Relaxed);
        if let Some(old) = lru.put(key, body) {
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
    pub builds: maps::MapBuilds,
    /// The web app's files, compressed once (filled in the background by `serve`).
    pub assets: assets::Assets,
}

impl AppState {
    pub fn new(engines: Vec<Arc<Engine>>, config: ServerConfig) -> Arc<Self> {
        let mut models: Vec<Served> = Vec::new();
        for engine in engines {
            let base: String =
                engine.info.name.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' }).collect();
            let mut id = base.clone();
            let mut n = 2;
            while models.iter().any(|m| m.id == id) {
                id = format!("{base}-{n}");
                n += 1;
            }
            let mut vocab: Vec<(String, u32)> = (0..engine.tok.vocab_size() as u32).map(|i| (engine.tok.token_text(i), i)).collect();
            vocab.sort();
            let batch = Batcher::new(engine.clone());
            let seats = WorkQueue::new(config.batch_rows.max(1), config.queue);
            models.push(Served { id, engine, vocab, batch, seats });
        }
        let limiter = config.rate_limit_per_minute.and_then(NonZeroU32::new).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        let queue = WorkQueue::new(config.workers, config.queue);
        let metrics = Metrics::new();
        Arc::new(Self {
            builds: maps::MapBuilds::new(queue.semaphore(), metrics.builds.clone()),
            queue,
            cache: ResultCache::new(config.cache_bytes),
            models,
            limiter,
            metrics,
            rate_checks: AtomicUsize::new(0),
            assets: assets::Assets::default(),
            config,
        })
    }

    pub fn model(&self, id: &str) -> Result<&Served, ServerError> {
        self.models.iter().find(|m| m.id == id).ok_or_else(|| ServerError::UnknownModel(id.to_owned()))
    }

    /// Schedule every view's map of every model, so the first visitors do not wait.
    pub fn warm_maps(&self) {
        for m in &self.models {
            self.builds.warm(&m.id, &m.engine, self.config.final_norm);
        }
    }

    /// The map of `view` of a served model, or `MapBuilding` while it is built.
    pub fn map(&self, m: &Served, view: shared::View) -> Result<Arc<crate::map::NeuronMap>, ServerError> {
        self.builds.get(&m.id, &m.engine, view, self.config.final_norm)
    }

    /// Refuse a request whose estimated work exceeds the per-request budget.
    pub fn check_work(&self, flops: f64) -> Result<(), ServerError> {
        Ok(crate::limits::check_work(flops, self.config.max_request_flops)?)
    }
}

/// Bind `addr` and run the server until it is stopped (SIGINT/SIGTERM shut it down gracefully).
pub async fn serve(state: Arc<AppState>, listener: TcpListener) -> std::io::Result<()> {
    let s = state.clone();
    std::thread::spawn(move || s.assets.build(&s.config.dist));
    let data = web::Data::from(state);
    HttpServer::new(move || App::new().app_data(data.clone()).configure(routes::configure))
        .on_connect(conn::on_connect)
        // The request head must arrive within 5 s (the body has its own deadline, see
        // `conn::body_deadline`); an idle keep-alive connection is closed after 5 s.
        .client_request_timeout(Duration::from_secs(5))
        .client_disconnect_timeout(Duration::from_secs(1))
        .keep_alive(Duration::from_secs(5))
        .listen(listener)?
        .shutdown_timeout(10)
        .run()
        .await
}

#[cfg(test)]
mod tests {
    use super::{ResultCache, ServerError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[actix_web::test]
    async fn the_result_cache_runs_work_only_on_a_miss_keeps_no_failures_and_stays_in_its_bytes() {
        let cache = ResultCache::new(100);
        let runs = AtomicUsize::new(0);
        let work = |body: &'static [u8]| {
            let runs = &runs;
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                Ok::<_, ServerError>(body.to_vec())
            }
        };
        assert_eq!(cache.get_or("a".into(), work(b"0123456789")).await.unwrap(), &b"0123456789"[..]);
        assert_eq!(cache.get_or("a".into(), work(b"other")).await.unwrap(), &b"0123456789"[..]);
        assert_eq!(runs.load(Ordering::Relaxed), 1, "a hit ran the work");
        // A failure is answered and not kept: the next request runs the work again.
        let failed = cache.get_or("b".into(), async { Err(ServerError::Internal("no".into())) }).await;
        assert!(failed.is_err());
        assert_eq!(cache.get_or("b".into(), work(b"b")).await.unwrap(), &b"b"[..]);
        assert_eq!(runs.load(Ordering::Relaxed), 2);
        // A body over a quarter of the budget is answered but not kept.
        assert_eq!(cache.get_or("big".into(), work(&[7; 30])).await.unwrap().len(), 30);
        assert!(cache.get("big").is_none());
        // 11 bytes kept; 90 more go one byte over the budget of 100, and the least recently used
        // ("b": "a" was used after it) makes room.
        assert!(cache.get("a").is_some());
        for (k, body) in [&[1u8; 20][..], &[2; 20], &[3; 25], &[4; 25]].into_iter().enumerate() {
            cache.get_or(format!("k{k}"), work(body)).await.unwrap();
        }
        assert_eq!(cache.bytes.load(Ordering::Relaxed), 100);
        assert!(cache.get("b").is_none() && cache.get("a").is_some() && cache.get("k0").is_some());
    }
}
