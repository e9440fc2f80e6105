//! Several requests decoded as one batch: the model's step of several groups (each its own cache,
//! positions and interventions) against each group's own forward pass, and the batcher's
//! generations against each request generated alone, on tiny random models of both families
//! (Gemma's prompts run past its sliding window) and on exact quantized weights.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use flash_interp::batch::{Batcher, Job};
use flash_interp::engine::{Engine, GenOutput, LoadOptions};
use flash_interp::model::{Cache, Clamp, Intervention, StepGroup};
use flash_interp::synthetic::{self, TinySpec};
use flash_interp::{Cancel, Error};
use shared::SamplingParams;

fn engine(spec: TinySpec) -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write_gguf(&spec, &path).unwrap();
    let e = Engine::load(&path, &LoadOptions::default()).unwrap();
    (dir, Arc::new(e))
}

fn specs() -> Vec<(&'static str, TinySpec)> {
    vec![
        ("llama", TinySpec { scale: 2.0, ..Default::default() }),
        ("llama q8_0 (exact kernels)", TinySpec { scale: 2.0, q8: true, ..Default::default() }),
        ("gemma3", TinySpec { scale: 2.0, gemma3: true, n_layers: 4, ..Default::default() }),
    ]
}

fn steer(layer: usize, neuron: usize, value: f32) -> Intervention {
    Intervention { clamps: vec![Clamp { layer, neuron, value }] }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

/// Three requests of different prompt lengths, row counts and clamps.
fn groups() -> Vec<(Vec<u32>, Vec<Intervention>)> {
    vec![
        (vec![1, 40, 77, 263, 5, 120, 99, 200, 31], vec![Intervention::none(), steer(1, 7, 6.0)]),
        (vec![3, 8], vec![steer(0, 2, -4.0)]),
        (vec![9, 10, 11, 12, 13], vec![Intervention::none(), steer(2, 30, 5.0), Intervention::none()]),
    ]
}

#[test]
fn a_step_of_several_requests_gives_each_what_its_own_forward_gives() {
    for (name, spec) in specs() {
        let (_dir, e) = engine(spec);
        let m = &e.model;
        let dev = Device::Cpu;
        let gs = groups();
        // Each request's prompt into its own cache, twice: one copy steps in the batch, one alone.
        let prefill = |ids: &[u32], ivs: &[Intervention]| {
            let mut c = Cache::new(e.config());
            m.forward(&Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap(), &mut c, ivs, &[]).unwrap();
            c
        };
        let mut batched: Vec<Cache> = gs.iter().map(|(ids, ivs)| prefill(ids, ivs)).collect();
        let mut alone: Vec<Cache> = gs.iter().map(|(ids, ivs)| prefill(ids, ivs)).collect();
        // Past Gemma's window of 4 on every row, with different tokens per row.
        for s in 0..6u32 {
            let tokens: Vec<Vec<u32>> = gs.iter().map(|(_, ivs)| (0..ivs.len() as u32).map(|r| 50 + 7 * s + 3 * r).collect()).collect();
            let got = {
                let mut step: Vec<StepGroup> =
                    batched.iter_mut().zip(&gs).zip(&tokens).map(|((cache, (_, ivs)), tokens)| StepGroup { tokens, cache, rows: ivs }).collect();
                rows(&m.step(&mut step).unwrap())
            };
            let mut want = Vec::new();
            for ((cache, (_, ivs)), tokens) in alone.iter_mut().zip(&gs).zip(&tokens) {
                let input = Tensor::from_vec(tokens.clone(), (tokens.len(), 1), &dev).unwrap();
                want.extend(rows(&m.forward(&input, cache, ivs, &[]).unwrap().logits));
            }
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{name}, step {s}: max |diff| {d}");
            // The clamps reach their own rows only: the steered row differs from its plain twin.
            assert!(max_abs_diff(&got[..1], &got[1..2]) > 1e-3, "{name}: the clamp changed nothing");
        }
        assert_eq!(batched.iter().map(Cache::seq_len).collect::<Vec<_>>(), vec![15, 8, 11]);
    }
}

#[test]
fn a_step_refuses_a_group_whose_cache_does_not_hold_its_rows() {
    let (_dir, e) = engine(TinySpec::default());
    let mut cache = Cache::new(e.config());
    let err = e.model.step(&mut [StepGroup { tokens: &[1], cache: &mut cache, rows: &[Intervention::none()] }]).unwrap_err();
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    e.model.forward(&Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap(), &mut cache, &[Intervention::none()], &[]).unwrap();
    let err = e.model.step(&mut [StepGroup { tokens: &[1, 2], cache: &mut cache, rows: &[Intervention::none()] }]).unwrap_err();
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    let bad = steer(0, 1_000_000, 1.0);
    let err = e.model.step(&mut [StepGroup { tokens: &[1], cache: &mut cache, rows: &[bad] }]).unwrap_err();
    assert!(matches!(err, Error::BadInput(_)), "{err}");
    assert_eq!(cache.seq_len(), 2, "a refused step changes nothing");
}

/// A request as the batcher and `generate_rows` both take it.
#[derive(Clone)]
struct Req {
    ids: Vec<u32>,
    variants: Vec<Intervention>,
    seeds: Vec<u64>,
    params: SamplingParams,
}

fn reqs() -> Vec<Req> {
    let p = |temperature, seed, max_new_tokens| SamplingParams { temperature, top_p: Some(0.9), seed, max_new_tokens };
    vec![
        Req { ids: vec![1, 40, 77, 263, 5], variants: vec![Intervention::none(), steer(1, 20, 8.0)], seeds: vec![5, 5], params: p(0.0, 5, 24) },
        Req { ids: vec![7, 8, 9], variants: vec![steer(0, 3, -6.0)], seeds: vec![11], params: p(0.8, 11, 9) },
        Req { ids: vec![2; 11], variants: vec![Intervention::none(); 3], seeds: vec![1, 2, 3], params: p(1.0, 1, 30) },
    ]
}

type Streamed = Vec<(usize, String)>;

type Outcome = mpsc::Receiver<(flash_interp::Result<Vec<GenOutput>>, Streamed)>;

/// Submit a request; its outputs and streamed text arrive on the returned channel.
fn submit(b: &Batcher, r: &Req, cancel: Cancel, stop_after: Option<usize>) -> Outcome {
    submit_with(b, r, cancel, stop_after, None)
}

/// [`submit`], and with `pace`, until a step of that batch has been shared each streamed token
/// waits 100 ms (on the batch thread), so that other requests' prompts, each run on a thread
/// of their own, join this one between its steps however busy the machine is.
fn submit_with(b: &Batcher, r: &Req, cancel: Cancel, stop_after: Option<usize>, pace: Option<std::sync::Weak<Batcher>>) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let streamed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = streamed.clone();
    let mut calls = 0;
    b.submit(Job {
        ids: r.ids.clone(),
        variants: r.variants.clone(),
        seeds: r.seeds.clone(),
        params: r.params.clone(),
        cancel,
        on_text: Box::new(move |row, text, _| {
            if pace.as_ref().and_then(|b| b.upgrade()).is_some_and(|b| {
                let (steps, job_steps) = b.steps();
                job_steps == steps
            }) {
                std::thread::sleep(Duration::from_millis(100));
            }
            s.lock().unwrap().push((row, text.to_owned()));
            calls += 1;
            stop_after.is_none_or(|n| calls < n)
        }),
        done: Box::new(move |out| {
            let streamed = std::mem::take(&mut *streamed.lock().unwrap());
            let _ = tx.send((out, streamed));
        }),
        hold: None,
    });
    rx
}

fn alone(e: &Engine, r: &Req) -> Vec<GenOutput> {
    e.generate_rows(&r.ids, &r.variants, &r.seeds, &r.params, true, &Cancel::default(), &mut |_, _, _| true).unwrap()
}

#[test]
fn concurrent_requests_in_one_batch_generate_what_each_generates_alone() {
    for (name, spec) in specs() {
        let (_dir, e) = engine(spec);
        let b = Arc::new(Batcher::new(e.clone()));
        let mut rs = reqs();
        // The first request runs long, and until a step is shared every token waits for the
        // others' prompts (see `submit_with`): they join it even when the machine is busy.
        rs[0].params.max_new_tokens = 120;
        let rxs: Vec<_> = rs.iter().map(|r| submit_with(&b, r, Cancel::default(), None, Some(Arc::downgrade(&b)))).collect();
        for (r, rx) in rs.iter().zip(rxs) {
            let (got, streamed) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            let got = got.unwrap();
            let want = alone(&e, r);
            for (row, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!((&g.tokens, &g.text, g.stop), (&w.tokens, &w.text, w.stop), "{name}, row {row}");
                assert_eq!(g.steps.iter().map(|s| s.id).collect::<Vec<_>>(), g.tokens);
                let text: String = streamed.iter().filter(|(r, _)| *r == row).map(|(_, t)| t.as_str()).collect();
                assert_eq!(text, g.text, "{name}: the streamed text adds up to the answer");
            }
        }
        let (steps, job_steps) = b.steps();
        assert!(job_steps > steps, "{name}: the requests never shared a step ({steps} steps, {job_steps} job-steps)");
        // A later request after the batch emptied runs too.
        let again = submit(&b, &rs[1], Cancel::default(), None).recv_timeout(Duration::from_secs(60)).unwrap().0.unwrap();
        assert_eq!(again[0].tokens, alone(&e, &rs[1])[0].tokens);
    }
}

#[test]
fn a_cancelled_request_leaves_the_batch_and_frees_what_it_held_while_the_others_finish() {
    let (_dir, e) = engine(TinySpec { scale: 2.0, ..Default::default() });
    let b = Batcher::new(e.clone());
    let rs = reqs();
    let (held, worker) = (Arc::new(()), Arc::new(()));
    // The long request: cancelled from outside after its first tokens.
    let cancel = Cancel::default();
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let c = cancel.clone();
    let mut first = Some(tx);
    b.submit(Job {
        ids: rs[2].ids.clone(),
        variants: rs[2].variants.clone(),
        seeds: rs[2].seeds.clone(),
        params: SamplingParams { max_new_tokens: 200, ..rs[2].params.clone() },
        cancel: cancel.clone(),
        on_text: Box::new(move |_, _, _| {
            if let Some(tx) = first.take() {
                c.cancel();
                let _ = tx.send(());
            }
            true
        }),
        done: Box::new(move |out| {
            let _ = done_tx.send(matches!(out, Err(Error::Cancelled)));
        }),
        hold: Some(Box::new((held.clone(), b.join_with(Box::new(worker.clone()))))),
    });
    // One that stops itself by refusing its stream (a departed client) after 3 pieces.
    let refused = submit(&b, &rs[2], Cancel::default(), Some(3));
    let fine = submit(&b, &rs[0], Cancel::default(), None);
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(done_rx.recv_timeout(Duration::from_secs(60)).unwrap(), "the cancelled job ends as cancelled");
    let (out, streamed) = refused.recv_timeout(Duration::from_secs(60)).unwrap();
    let out = out.unwrap();
    assert!(
        out.iter().all(|o| matches!(o.stop, shared::StopReason::Cancelled | shared::StopReason::Eos)),
        "{:?}",
        out.iter().map(|o| o.stop).collect::<Vec<_>>()
    );
    assert!(out.iter().any(|o| o.stop == shared::StopReason::Cancelled));
    assert_eq!(streamed.len(), 3, "no text after the stream was refused");
    let got = fine.recv_timeout(Duration::from_secs(60)).unwrap().0.unwrap();
    assert_eq!(got.iter().map(|g| &g.tokens).collect::<Vec<_>>(), alone(&e, &rs[0]).iter().map(|g| &g.tokens).collect::<Vec<_>>());
    // The cancelled job's seats and worker permit are dropped once it has left.
    for _ in 0..200 {
        if Arc::strong_count(&held) == 1 && Arc::strong_count(&worker) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!((Arc::strong_count(&held), Arc::strong_count(&worker)), (1, 1));
    assert_eq!(b.rows(), 0);
}

#[test]
fn the_batch_holds_one_worker_permit_while_it_has_jobs() {
    let (_dir, e) = engine(TinySpec::default());
    let b = Batcher::new(e);
    let (w1, w2) = (Arc::new(()), Arc::new(()));
    assert!(b.join().is_none(), "an idle batch holds no worker: the first request brings one");
    let first = b.join_with(Box::new(w1.clone()));
    let second = b.join().expect("later requests join under the held permit");
    // A permit brought while one is held (two requests that both found the batch idle) goes back at once.
    let third = b.join_with(Box::new(w2.clone()));
    assert_eq!((Arc::strong_count(&w1), Arc::strong_count(&w2)), (2, 1));
    drop((first, third));
    assert_eq!(Arc::strong_count(&w1), 2, "held while a job is in the batch");
    drop(second);
    assert_eq!(Arc::strong_count(&w1), 1, "given back by the last job to leave");
    assert!(b.join().is_none());
}

#[test]
fn a_panicking_job_ends_its_step_with_an_error_and_the_batch_goes_on() {
    let (_dir, e) = engine(TinySpec { scale: 2.0, ..Default::default() });
    let b = Batcher::new(e.clone());
    let rs = reqs();
    let (tx, rx) = mpsc::channel();
    b.submit(Job {
        ids: rs[0].ids.clone(),
        variants: rs[0].variants.clone(),
        seeds: rs[0].seeds.clone(),
        params: rs[0].params.clone(),
        cancel: Cancel::default(),
        on_text: Box::new(|_, _, _| panic!("a bug in a stream callback")),
        done: Box::new(move |out| {
            let _ = tx.send(out.is_err());
        }),
        hold: None,
    });
    assert!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), "the job ends with an error");
    let after = submit(&b, &rs[1], Cancel::default(), None).recv_timeout(Duration::from_secs(60)).unwrap().0.unwrap();
    assert_eq!(after[0].tokens, alone(&e, &rs[1])[0].tokens, "the batch thread still runs");
}

#[test]
fn a_dropped_batcher_finishes_its_jobs_before_its_thread_ends() {
    let (_dir, e) = engine(TinySpec { scale: 2.0, ..Default::default() });
    let b = Batcher::new(e.clone());
    let rs = reqs();
    let rx = submit(&b, &rs[2], Cancel::default(), None);
    drop(b);
    let got = rx.recv_timeout(Duration::from_secs(60)).unwrap().0.unwrap();
    assert_eq!(got.iter().map(|g| &g.tokens).collect::<Vec<_>>(), alone(&e, &rs[2]).iter().map(|g| &g.tokens).collect::<Vec<_>>());
}

/// A prompt already run is kept: a later job of the same prompt and interventions (other seeds)
/// starts from copies of those runs and answers what it answers alone, on both families (Gemma's
/// prompt past its window) and on exact kernels; another clamp runs its prompt; the bytes kept
/// stay within the budget, the least recently used going first; a batch that keeps nothing
/// answers the same.
#[test]
fn a_kept_prompt_starts_a_later_job_that_answers_what_it_answers_alone() {
    let p = |seed| SamplingParams { temperature: 0.9, top_p: None, seed, max_new_tokens: 20 };
    let ids = vec![1, 40, 77, 263, 5, 120, 99, 200, 31];
    let (plain, clamped) = (Intervention::none(), steer(1, 20, 8.0));
    let first = Req {
        ids: ids.clone(),
        variants: vec![plain.clone(), clamped.clone(), plain.clone(), clamped.clone()],
        seeds: vec![1, 1, 2, 2],
        params: p(1),
    };
    let later = Req { seeds: vec![7, 7, 8, 8], params: p(7), ..first.clone() };
    let run = |b: &Batcher, r: &Req| submit(b, r, Cancel::default(), None).recv_timeout(Duration::from_secs(60)).unwrap().0.unwrap();
    let same = |got: &[GenOutput], want: &[GenOutput], what: &str| {
        for (row, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!((&g.tokens, &g.text, g.stop), (&w.tokens, &w.text, w.stop), "{what}, row {row}");
        }
    };
    for (name, spec) in specs() {
        let (_dir, e) = engine(spec);
        let b = Batcher::new(e.clone());
        same(&run(&b, &first), &alone(&e, &first), name);
        assert_eq!(b.prompts().stats(), (0, 1), "{name}: the first job runs its prompt");
        let kept = b.prompts().bytes();
        assert!(kept > 0 && kept <= flash_interp::prompt_cache::DEFAULT_BYTES, "{name}: {kept} bytes");
        let got = run(&b, &later);
        assert_eq!(b.prompts().stats(), (2, 1), "{name}: the later job starts from both kept runs");
        same(&got, &alone(&e, &later), name);
        assert_ne!(got[0].tokens, run(&b, &first)[0].tokens, "{name}: other seeds, other samples");
        // Another clamp on the same prompt runs it (and answers as alone).
        let other = Req { variants: vec![steer(2, 5, -3.0)], seeds: vec![3], ..first.clone() };
        same(&run(&b, &other), &alone(&e, &other), name);
        assert_eq!(b.prompts().stats().1, 2, "{name}");

        // A budget of one run: the next prompt's run pushes it out, and it runs again.
        let one = Req { variants: vec![plain.clone()], seeds: vec![4], ..first.clone() };
        let b = Batcher::with_prompt_cache(e.clone(), kept / 2);
        run(&b, &one);
        assert_eq!(b.prompts().bytes(), kept / 2, "{name}: one run is half of the pair's bytes");
        let shorter = Req { ids: ids[..6].to_vec(), ..one.clone() };
        run(&b, &shorter);
        assert!(b.prompts().bytes() <= kept / 2, "{name}");
        same(&run(&b, &one), &alone(&e, &one), name);
        assert_eq!(b.prompts().stats(), (0, 3), "{name}: the evicted prompt ran again");
        // Keeping nothing, the same answers.
        let b = Batcher::with_prompt_cache(e.clone(), 0);
        same(&run(&b, &later), &alone(&e, &later), name);
        assert_eq!((b.prompts().bytes(), b.prompts().stats().0), (0, 0), "{name}");
    }
}
