//! Generations of concurrent requests in one batch. A [`Batcher`] owns one thread per model that
//! runs every generation in progress side by side: each decoding step feeds all their rows through
//! the model at once ([`LanguageModel::step`]: the weights are read once for every row, which is
//! what a step costs on a CPU), while each request keeps its own cache, positions, interventions,
//! samplers, stop conditions and stream. Requests join between steps (their prompt runs first, on
//! a thread of its own beside the batch's steps, so that a long prompt does not stall the answers
//! streaming meanwhile) and leave when they finish, fail or are cancelled, freeing what they held.
//!
//! What bounds the batch is the caller's: the server admits a request's rows into a fixed number
//! of seats ([`Job::hold`]), and the batch holds one worker permit for as long as it has jobs
//! ([`Batcher::join`]): the first request brings it, later ones join under it, and the last one
//! to leave gives it back.
//!
//! [`LanguageModel::step`]: crate::model::LanguageModel::step

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use rayon::prelude::*;
use shared::{GenerateRequest, GenerateResponse, SamplingParams, TokenStep, Variant};

use crate::cancel::Cancel;
use crate::engine::{Engine, GenOutput, Generation};
use crate::error::{Error, Result};
use crate::model::{all_finite, Intervention, StepGroup};
use crate::prompt_cache::{self, PromptCache};

/// Called with a row's new text and the tokens it comes from; `false` stops the job.
pub type OnText = Box<dyn FnMut(usize, &str, &[TokenStep]) -> bool + Send>;
/// Called once with the job's outputs (one per row) or its error.
pub type Done = Box<dyn FnOnce(Result<Vec<GenOutput>>) + Send>;

/// One generation handed to a [`Batcher`]: what [`Engine::generate_rows`] takes, with callbacks.
pub struct Job {
    pub ids: Vec<u32>,
    pub variants: Vec<Intervention>,
    pub seeds: Vec<u64>,
    pub params: SamplingParams,
    /// Checked between steps: a cancelled job leaves the batch before the next one.
    pub cancel: Cancel,
    pub on_text: OnText,
    pub done: Done,
    /// Whatever the job holds while it runs (the server's seats in the batch, its [`Member`]
    /// place): dropped with it, however it ends.
    pub hold: Option<Box<dyn Send>>,
}

impl Job {
    /// A `shared::GenerateRequest` as a job (validated: everything it can fail on before it
    /// runs). `on_text(sample, variant, text, steps)` streams; `done` gets the response.
    pub fn request(
        engine: &Engine,
        req: &GenerateRequest,
        cancel: Cancel,
        mut on_text: impl FnMut(usize, Variant, &str, &[TokenStep]) -> bool + Send + 'static,
        done: impl FnOnce(Result<GenerateResponse>) + Send + 'static,
    ) -> Result<Self> {
        let (ids, variants, seeds, what) = engine.prepare_generate(req)?;
        let what = Arc::new(what);
        let w = what.clone();
        let prompt_tokens = ids.len();
        Ok(Job {
            ids,
            variants,
            seeds,
            params: req.sampling.clone(),
            cancel,
            on_text: Box::new(move |r, text, steps| on_text(w[r].0, w[r].1, text, steps)),
            done: Box::new(move |outs| done(outs.map(|outs| GenerateResponse { prompt_tokens, completions: Engine::completions(outs, &what) }))),
            hold: None,
        })
    }

    /// A job that streams nothing, is never cancelled from outside and holds nothing (for
    /// benchmarks and checks): its outputs come through the returned [`Outcome`].
    pub fn plain(ids: Vec<u32>, variants: Vec<Intervention>, seeds: Vec<u64>, params: SamplingParams) -> (Self, Outcome) {
        let (tx, rx) = channel();
        let done: Done = Box::new(move |out| drop(tx.send(out)));
        (Self { ids, variants, seeds, params, cancel: Cancel::default(), on_text: Box::new(|_, _, _| true), done, hold: None }, Outcome(rx))
    }

    pub fn rows(&self) -> usize {
        self.variants.len()
    }

    /// The job's end: what it held is given back first (so a client that has its answer finds
    /// its seats free), and its text callback (a stream's sender) is dropped, so the last event
    /// `done` sends ends a stream; then `done` gets the outcome.
    fn end(self, out: Result<Vec<GenOutput>>) {
        let Job { done, hold, on_text, .. } = self;
        drop(hold);
        drop(on_text);
        done(out)
    }
}

/// The outputs of a [`Job::plain`], once it ends.
pub struct Outcome(Receiver<Result<Vec<GenOutput>>>);

impl Outcome {
    /// Wait for the job's outputs (one per row) or its error.
    pub fn wait(self) -> Result<Vec<GenOutput>> {
        self.0.recv().map_err(|_| internal("the batch stopped"))?
    }
}

/// A job leaves the batch: its rows stop counting as running before it ends (so that whoever
/// has its answer sees them gone), then it ends with `out`.
fn leave(stats: &Stats, rows: usize, job: Job, out: Result<Vec<GenOutput>>) {
    stats.rows.fetch_sub(rows, Ordering::Relaxed);
    job.end(out)
}

impl Live {
    fn end(self, stats: &Stats, out: Result<Vec<GenOutput>>) {
        leave(stats, self.gen.rows(), self.job, out)
    }
}

/// A job in the batch: its generation and the tokens or logits of its next step.
struct Live {
    job: Job,
    gen: Generation,
    logits: Tensor,
    next: Vec<u32>,
}

/// What reaches the batch thread.
enum Msg {
    /// A new job. Its prompt runs on a thread of its own, beside the batch's steps, so that a
    /// long prompt does not hold up the answers streaming meanwhile.
    Job(Job),
    /// A job whose prompt has run: it joins the batch before the next step.
    Ready(Box<(Job, Result<(Generation, Tensor)>)>),
    /// The batcher is gone: the thread ends once its jobs have.
    Close,
}

/// The batch thread's state.
#[derive(Default)]
struct State {
    live: Vec<Live>,
    /// Jobs whose prompt is running.
    starting: usize,
    closing: bool,
}

/// The batch of one model's generations, run on its own thread (see the module's docs).
pub struct Batcher {
    tx: Sender<Msg>,
    stats: Arc<Stats>,
    slot: Arc<Mutex<Slot>>,
    /// The prompts its jobs ran, kept for later jobs of the same prompt.
    prompts: Arc<PromptCache>,
    /// Told when the batch takes a worker permit (see [`Batcher::worker_gained`]).
    gained: tokio::sync::Notify,
}

/// The batch's worker permit and the jobs it runs under it.
#[derive(Default)]
struct Slot {
    worker: Option<Box<dyn Send>>,
    jobs: usize,
}

/// A job's place under the batch's worker permit ([`Batcher::join`]); the last one dropped gives
/// the permit back.
pub struct Member(Arc<Mutex<Slot>>);

impl Drop for Member {
    fn drop(&mut self) {
        let worker = {
            let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
            slot.jobs -= 1;
            if slot.jobs == 0 {
                slot.worker.take()
            } else {
                None
            }
        };
        drop(worker);
    }
}

/// What the batch thread has done, for metrics and tests.
#[derive(Default)]
struct Stats {
    /// Rows running now.
    rows: AtomicUsize,
    /// Decoding steps run, and the jobs they carried (summed over steps).
    steps: AtomicU64,
    job_steps: AtomicU64,
}

impl Batcher {
    /// A batch for `engine`'s model, keeping up to [`prompt_cache::DEFAULT_BYTES`] of prompts.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self::with_prompt_cache(engine, prompt_cache::DEFAULT_BYTES)
    }

    /// A batch keeping up to `bytes` of prompts already run (0: none).
    pub fn with_prompt_cache(engine: Arc<Engine>, bytes: usize) -> Self {
        let (tx, rx) = channel();
        let stats = Arc::new(Stats::default());
        let prompts = Arc::new(PromptCache::new(bytes));
        let (s, t, p) = (stats.clone(), tx.clone(), prompts.clone());
        std::thread::Builder::new().name("batcher".into()).spawn(move || run(&engine, &t, &rx, &s, &p)).expect("spawning the batch thread");
        Self { tx, stats, slot: Arc::default(), prompts, gained: tokio::sync::Notify::new() }
    }

    /// The prompts kept for later jobs.
    pub fn prompts(&self) -> &PromptCache {
        &self.prompts
    }

    /// A place for one more job under the batch's worker permit, if the batch holds one now
    /// (it keeps it while the place lives); `None`: bring one with [`Batcher::join_with`].
    pub fn join(&self) -> Option<Member> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.worker.is_some().then(|| {
            slot.jobs += 1;
            Member(self.slot.clone())
        })
    }

    /// A place for one more job, bringing a worker permit: the batch keeps it if it holds none
    /// (another request may have brought one meanwhile), else it is given back at once.
    pub fn join_with(&self, worker: Box<dyn Send>) -> Member {
        let spare = {
            let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.jobs += 1;
            if slot.worker.is_none() {
                slot.worker = Some(worker);
                None
            } else {
                Some(worker)
            }
        };
        if spare.is_none() {
            self.gained.notify_waiters();
        }
        drop(spare);
        Member(self.slot.clone())
    }

    /// Completes when the batch next takes a worker permit ([`Batcher::join_with`]): a request
    /// waiting for a permit of its own can [`Batcher::join`] instead. Enable it (or poll it once)
    /// before looking with `join`, so that a permit taken in between is not missed.
    pub fn worker_gained(&self) -> tokio::sync::futures::Notified<'_> {
        self.gained.notified()
    }

    /// Add a job to the batch; it starts before the next step. Its `done` is always called.
    pub fn submit(&self, job: Job) {
        if let Err(e) = self.tx.send(Msg::Job(job)) {
            if let Msg::Job(job) = e.0 {
                job.end(Err(internal("the batch thread has stopped")));
            }
        }
    }

    /// Rows running in the batch now.
    pub fn rows(&self) -> usize {
        self.stats.rows.load(Ordering::Relaxed)
    }

    /// Decoding steps run so far, and the jobs they carried summed over the steps (more than
    /// the steps when requests shared them).
    pub fn steps(&self) -> (u64, u64) {
        (self.stats.steps.load(Ordering::Relaxed), self.stats.job_steps.load(Ordering::Relaxed))
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Close);
    }
}

/// An internal error of the batch (answered only as "internal error").
pub(crate) fn internal(message: impl Into<String>) -> Error {
    Error::Io(std::io::Error::other(message.into()))
}

/// The batch thread: until the batcher is gone, start the jobs that came, sample every job's
/// rows, let finished ones go, and run one step of all the others together. A panic (a bug)
/// ends the jobs of that step with an internal error, not the thread.
fn run(engine: &Arc<Engine>, tx: &Sender<Msg>, rx: &Receiver<Msg>, stats: &Stats, prompts: &Arc<PromptCache>) {
    let mut state = State::default();
    loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| iteration(engine, tx, rx, stats, prompts, &mut state))) {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                tracing::error!("a generation batch step panicked; its jobs end with an internal error");
                for l in state.live.drain(..) {
                    l.end(stats, Err(internal("the generation batch failed")));
                }
                // Jobs the panic dropped mid-way are not counted either.
                stats.rows.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Run a job's prompt on a thread of its own; it comes back as [`Msg::Ready`].
fn start(engine: &Arc<Engine>, tx: &Sender<Msg>, prompts: &Arc<PromptCache>, job: Job) {
    let (engine, tx, prompts) = (engine.clone(), tx.clone(), prompts.clone());
    std::thread::spawn(move || {
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.start_generation(&job.ids, &job.variants, &job.seeds, &job.params, &job.cancel, Some(&prompts))
        }));
        let _ = tx.send(Msg::Ready(Box::new((job, started.unwrap_or_else(|_| Err(internal("the generation batch failed")))))));
    });
}

/// One turn of the batch thread; `false` once the batcher is gone and every job has ended.
fn iteration(engine: &Arc<Engine>, tx: &Sender<Msg>, rx: &Receiver<Msg>, stats: &Stats, prompts: &Arc<PromptCache>, state: &mut State) -> bool {
    let mut came = Vec::new();
    if state.live.is_empty() {
        if state.closing && state.starting == 0 {
            return false;
        }
        match rx.recv() {
            Ok(msg) => came.push(msg),
            Err(_) => return false,
        }
    }
    came.extend(rx.try_iter());
    for msg in came {
        match msg {
            Msg::Job(job) => {
                state.starting += 1;
                start(engine, tx, prompts, job);
            }
            Msg::Ready(ready) => {
                let (job, started) = *ready;
                state.starting -= 1;
                match started {
                    Ok(_) if job.cancel.is_cancelled() => job.end(Err(Error::Cancelled)),
                    Ok((gen, logits)) => {
                        stats.rows.fetch_add(gen.rows(), Ordering::Relaxed);
                        state.live.push(Live { job, gen, logits, next: Vec::new() })
                    }
                    Err(e) => job.end(Err(e)),
                }
            }
            Msg::Close => state.closing = true,
        }
    }
    let live = &mut state.live;
    if live.is_empty() {
        return true;
    }
    // Every job samples its rows (in parallel: they are independent) and streams.
    let advanced: Vec<Result<Option<Vec<u32>>>> = live.par_iter_mut().map(|l| engine.advance(&mut l.gen, &l.logits, &mut *l.job.on_text)).collect();
    let mut kept = Vec::with_capacity(live.len());
    for (mut l, advanced) in live.drain(..).zip(advanced) {
        match advanced {
            Ok(Some(next)) if !l.job.cancel.is_cancelled() => {
                l.next = next;
                kept.push(l);
            }
            Ok(Some(_)) => l.end(stats, Err(Error::Cancelled)),
            Ok(None) => {
                let (rows, mut job) = (l.gen.rows(), l.job);
                let outs = engine.finish(l.gen, &mut *job.on_text);
                leave(stats, rows, job, outs)
            }
            Err(e) => l.end(stats, Err(e)),
        }
    }
    *live = kept;
    if live.is_empty() {
        return true;
    }
    stats.steps.fetch_add(1, Ordering::Relaxed);
    stats.job_steps.fetch_add(live.len() as u64, Ordering::Relaxed);
    match step(engine, stats, live) {
        Ok(()) => {}
        Err(e) => {
            // A failure of the whole step (not of one job's numbers) ends every job in it.
            let message = e.to_string();
            tracing::error!("batch step failed: {message}");
            for l in live.drain(..) {
                l.end(stats, Err(internal(message.clone())));
            }
        }
    }
    true
}

/// One step of every live job together; each job's logits are its rows of the result. A job
/// whose logits are not finite (an overflowing clamp) fails alone.
fn step(engine: &Engine, stats: &Stats, live: &mut Vec<Live>) -> Result<()> {
    let logits = {
        let mut groups: Vec<StepGroup> =
            live.iter_mut().map(|l| StepGroup { tokens: &l.next, cache: &mut l.gen.cache, rows: &l.gen.variants }).collect();
        engine.model.step(&mut groups)?
    };
    // Each job is kept or ended here, whatever happens to the others: none is dropped unended.
    let mut at = 0;
    let mut kept = Vec::with_capacity(live.len());
    for mut l in live.drain(..) {
        let n = l.next.len();
        let rows = logits.narrow(0, at, n).map_err(Error::from).and_then(|t| Ok((all_finite(&t)?, t)));
        at += n;
        match rows {
            Ok((true, t)) => {
                l.logits = t;
                kept.push(l);
            }
            Ok((false, _)) => l.end(stats, Err(crate::model::non_finite())),
            Err(e) => l.end(stats, Err(internal(e.to_string()))),
        }
    }
    *live = kept;
    Ok(())
}
