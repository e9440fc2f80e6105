//! `flash-interp device-check`: the same model, with the same weights, on the CPU and on another
//! device (a CUDA GPU), compared piece by piece: the neuron map (with and without the final
//! norm), concept search, a clamp sweep and greedy tokens. The CPU is the reference; the report
//! says how far the device is from it and whether that is within the stated tolerances.
//!
//! Tolerances (see [`Tolerance::for_dtype`]). Both sides hold the weights in the same dtype, so
//! the map's products are the same numbers and only the summation order differs:
//! - **map**: logsumexps to a relative 1e-5 (f32) / 1e-4 (bf16, f16); the k-th largest logit of
//!   every neuron to 1e-4 × max(1, |logit|) (f32) / 1e-3 (bf16, f16), with the final norm folded
//!   in too (the device splits the normed directions into two bf16 parts,
//!   [`crate::map::split_directions`], where the CPU folds the norm into W_U in f32). Top token
//!   ids are equal except **near-ties**: where ids differ, the CPU's logits of
//!   the two tokens must be within twice that value tolerance.
//! - **search**: the same strongest neuron, unless the CPU's first two scores are within 1e-3.
//! - **neuron detail** (the search's neuron, final norm folded in, top 10 of every view and
//!   polarity): log-probabilities at the same rank within the map's value tolerance, relative
//!   to max(1, |log p|); ids equal except near-ties (the device's token is in the CPU's top 20
//!   at a log-probability within twice that of the CPU's token at that rank).
//! - **sweep**: p(target) within 1e-4 (f32) / 2e-2 (bf16, f16), absolute.
//! - **greedy tokens**: identical in f32; in bf16/f16 activations are rounded at every op in a
//!   different order on each side, so the answers may part after a while: the first 4 tokens
//!   must agree, and the common prefix is reported. Either way, answers may also part at a
//!   **near-tie**: where both sides' logits after the common prefix differ by at most 1e-3 (f32)
//!   / 0.1 (bf16, f16), absolute, and the CPU's logits of the two tokens chosen are within twice
//!   that difference (the most it can reorder). Where they part is reported.

use std::path::Path;

use candle_core::{DType, Device, IndexOp};
use serde::Serialize;
use shared::{Polarity, SamplingParams, View};

use crate::cancel::Cancel;
use crate::engine::{Engine, LoadOptions};
use crate::error::Result;
use crate::map::NeuronMap;
use crate::model::{Intervention, WeightMode};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    pub lse_rel: f64,
    pub value_rel: f64,
    pub search_tie: f64,
    pub sweep_abs: f64,
    pub greedy_prefix: usize,
    /// The most the two sides' next-token logits may differ where greedy answers part at a
    /// near-tie (absolute).
    pub logit_abs: f64,
}

impl Tolerance {
    pub fn for_dtype(dtype: DType) -> Self {
        if dtype == DType::F32 {
            Self { lse_rel: 1e-5, value_rel: 1e-4, search_tie: 1e-3, sweep_abs: 1e-4, greedy_prefix: usize::MAX, logit_abs: 1e-3 }
        } else {
            Self { lse_rel: 1e-4, value_rel: 1e-3, search_tie: 1e-3, sweep_abs: 2e-2, greedy_prefix: 4, logit_abs: 0.1 }
        }
    }
}

/// How two maps of the same model differ.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MapAgreement {
    pub final_norm: bool,
    pub neurons: usize,
    pub seconds_cpu: f64,
    pub seconds_device: f64,
    /// Largest |Δ lse| / max(1, |lse|) over neurons and polarities.
    pub lse_max_rel_err: f64,
    /// Largest |Δ logit| / max(1, |logit|) at the same rank of the top k.
    pub value_max_rel_err: f64,
    /// Top-k positions whose token ids differ, of all positions.
    pub id_mismatches: usize,
    pub positions: usize,
    /// Mismatches that are not near-ties (should be 0).
    pub unexplained: usize,
    /// Largest relative error of the logits' standard deviation.
    pub std_max_rel_err: f64,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCheck {
    pub model: String,
    pub weights: String,
    pub device: String,
    pub tolerance: Tolerance,
    pub maps: Vec<MapAgreement>,
    pub search_token: String,
    pub search_top_cpu: (usize, usize, Polarity),
    pub search_top_device: (usize, usize, Polarity),
    pub search_pass: bool,
    pub sweep_max_abs_err: f64,
    pub sweep_pass: bool,
    /// The prompt of the greedy answers compared (see [`GREEDY_PROMPTS`]).
    pub greedy_prompt: String,
    pub greedy_cpu: Vec<u32>,
    pub greedy_device: Vec<u32>,
    pub greedy_common_prefix: usize,
    /// Where the greedy answers part, if they do.
    pub greedy_parting: Option<Parting>,
    pub greedy_pass: bool,
    /// The neuron detail of the search's neuron: the largest log-probability error at the same
    /// rank, and how many differing ids are not near-ties.
    pub detail_max_logprob_err: f64,
    pub detail_unexplained: usize,
    pub detail_pass: bool,
    /// Three greedy requests at once through the server's batch on the device (different prompt
    /// lengths, the last with the sweep's neuron clamped), each against the CPU's answer to it
    /// alone: the common prefix of each, and how many jobs the shared steps carried on average.
    pub batch_common_prefix: Vec<usize>,
    pub batch_partings: Vec<Option<Parting>>,
    pub batch_jobs_per_step: f64,
    pub batch_pass: bool,
    /// Blocks whose decoding steps took the fused path on the device (FLASH_INTERP_FUSED_DECODE).
    pub fused_decode_blocks: usize,
    /// Decoding steps replayed from a captured CUDA graph during this model's checks
    /// (`FLASH_INTERP_CUDA_GRAPH=1`; the greedy answer's steps after its second).
    pub graph_replays: u64,
    pub pass: bool,
}

/// Prompts tried in turn for the greedy answers, until the CPU answers one with 8 tokens or more.
pub const GREEDY_PROMPTS: [&str; 4] = ["the dog and the cat", "once upon a time there was a", "a", "hello world"];

/// Where two greedy answers to the same prompt part: at which generated token, how far apart the
/// CPU's logits put the two tokens chosen there, and how far the two sides' logits differ there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Parting {
    pub at: usize,
    pub gap: f64,
    pub logit_err: f64,
    /// `logit_err` within [`Tolerance::logit_abs`] and `gap` within twice `logit_err`: a
    /// difference of that size can reorder the two tokens.
    pub near_tie: bool,
}

/// Where the greedy answers `c` (CPU) and `d` (device) to `ids` with intervention `row` part;
/// `None` if they do not. An answer that stops where the other goes on parts at no near-tie.
fn parting(cpu: &Engine, dev: &Engine, ids: &[u32], row: &Intervention, c: &[u32], d: &[u32], tol: &Tolerance) -> Result<Option<Parting>> {
    let at = c.iter().zip(d).take_while(|(a, b)| a == b).count();
    if at == c.len() && at == d.len() {
        return Ok(None);
    }
    let context: Vec<u32> = ids.iter().chain(&c[..at]).copied().collect();
    let logits = |e: &Engine| -> Result<Vec<f32>> {
        let mut cache = crate::model::Cache::new(e.config());
        let out = e.model.forward(&e.input(&context)?, &mut cache, std::slice::from_ref(row), &[])?;
        Ok(out.logits.i(0)?.to_dtype(DType::F32)?.to_vec1()?)
    };
    let (lc, ld) = (logits(cpu)?, logits(dev)?);
    let logit_err = lc.iter().zip(&ld).map(|(a, b)| abs_err(*a as f64, *b as f64)).fold(0.0, f64::max);
    let gap = match (c.get(at), d.get(at)) {
        (Some(&a), Some(&b)) => (lc[a as usize] as f64 - lc[b as usize] as f64).abs(),
        _ => f64::INFINITY,
    };
    Ok(Some(Parting { at, gap, logit_err, near_tie: logit_err <= tol.logit_abs && gap <= 2.0 * logit_err }))
}

/// Absolute error |a - b|, under the same rules as [`rel`].
fn abs_err(a: f64, b: f64) -> f64 {
    err(a, b, 1.0)
}

/// Relative error of `a` against `b` (at least 1 in the denominator).
fn rel(a: f64, b: f64) -> f64 {
    err(a, b, b.abs().max(1.0))
}

/// |a - b| / scale. Equal values (infinities included) are no error; a NaN on either side is an
/// infinite one (f64::max would drop a NaN, and a NaN must fail the check).
fn err(a: f64, b: f64, scale: f64) -> f64 {
    if a == b {
        return 0.0;
    }
    let e = (a - b).abs() / scale;
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

/// Compare two maps of the same model (`cpu` the reference) under `value_tol`.
pub fn compare_maps(cpu: &NeuronMap, dev: &NeuronMap, tol: &Tolerance, value_tol: f64) -> MapAgreement {
    let (n, k) = (cpu.n_neurons(), cpu.meta.k);
    let mut a = MapAgreement { final_norm: cpu.meta.final_norm, neurons: n, ..Default::default() };
    for p in [Polarity::Pos, Polarity::Neg] {
        let (tc, td) = (cpu.table(p), dev.table(p));
        for i in 0..n {
            a.lse_max_rel_err = a.lse_max_rel_err.max(rel(td.lse[i] as f64, tc.lse[i] as f64));
            let logits = |t: &crate::map::PolarityTable, lse: f32| -> Vec<f64> {
                t.probs[i * k..(i + 1) * k].iter().map(|&q| q.ln() as f64 + lse as f64).collect()
            };
            let (lc, ld) = (logits(tc, tc.lse[i]), logits(td, td.lse[i]));
            let (ic, id) = (&tc.ids[i * k..(i + 1) * k], &td.ids[i * k..(i + 1) * k]);
            for j in 0..k {
                a.positions += 1;
                a.value_max_rel_err = a.value_max_rel_err.max(rel(ld[j], lc[j]));
                if ic[j] != id[j] {
                    a.id_mismatches += 1;
                    // The CPU's logit of the device's token: known when it is in the CPU's top k,
                    // else at most the CPU's k-th.
                    let other = ic.iter().position(|&t| t == id[j]).map(|r| lc[r]).unwrap_or(lc[k - 1]);
                    let gap = (lc[j] - other).abs();
                    if gap.is_nan() || gap > 2.0 * value_tol * lc[j].abs().max(1.0) {
                        a.unexplained += 1;
                    }
                }
            }
        }
    }
    for i in 0..n {
        let e = (dev.moments.std[i] as f64 - cpu.moments.std[i] as f64).abs() / (cpu.moments.std[i] as f64).max(1e-6);
        a.std_max_rel_err = if e.is_nan() { f64::INFINITY } else { a.std_max_rel_err.max(e) };
    }
    a.pass = a.unexplained == 0 && a.lse_max_rel_err <= tol.lse_rel && a.value_max_rel_err <= value_tol && a.std_max_rel_err <= 10.0 * value_tol;
    a
}

/// Run the whole comparison on one model file or directory.
pub fn check_model(path: &Path, device: &Device, mode: WeightMode) -> Result<ModelCheck> {
    let replays_before = crate::model::graph::replays();
    let cpu = Engine::load(path, &LoadOptions { device: Device::Cpu, mode, ..Default::default() })?;
    let dev = Engine::load(path, &LoadOptions { device: device.clone(), mode, ..Default::default() })?;
    let dtype = dev.weight_mode().compute_dtype();
    let tol = Tolerance::for_dtype(dtype);
    let mut maps = vec![];
    let mut built = vec![];
    for final_norm in [false, true] {
        let build = |e: &Engine| -> Result<(NeuronMap, f64)> {
            let t = std::time::Instant::now();
            let m = NeuronMap::build(&*e.model, View::Up, final_norm, "device-check", &e.weights_desc(), &|_, _| {})?;
            Ok((m, t.elapsed().as_secs_f64()))
        };
        let ((mc, sc), (md, sd)) = (build(&cpu)?, build(&dev)?);
        let mut a = compare_maps(&mc, &md, &tol, tol.value_rel);
        (a.seconds_cpu, a.seconds_device) = (sc, sd);
        maps.push(a);
        built.push((mc, md));
    }

    // Search for the token the CPU's strongest up neuron of the last layer is about.
    let (mc, md) = &built[0];
    let last = mc.meta.n_layers - 1;
    let token = mc.top(Polarity::Pos, last, 0).0[0];
    let search = |e: &Engine, m: &NeuronMap| crate::analysis::search(e, m, &[token], 2);
    let (sc, sd) = (search(&cpu, mc)?, search(&dev, md)?);
    let key = |h: &shared::SearchHit| (h.layer, h.neuron, h.polarity);
    let search_pass =
        key(&sc.top[0]) == key(&sd.top[0]) || sc.top.get(1).is_some_and(|h| rel(h.score as f64, sc.top[0].score as f64) <= tol.search_tie);

    // A sweep of that neuron and greedy tokens, from one prompt.
    let ids = cpu.tok.encode_prompt("the dog and the cat")?;
    let hit = &sc.top[0];
    let values: Vec<f32> = (-4..=4).map(|v| v as f32 * 2.0).collect();
    let cancel = Cancel::default();
    let (wc, wd) =
        (cpu.sweep(&ids, hit.layer, hit.neuron, token, &values, &cancel)?, dev.sweep(&ids, hit.layer, hit.neuron, token, &values, &cancel)?);
    let sweep_max_abs_err = std::iter::once((wc.baseline, wd.baseline))
        .chain(wc.probs.iter().copied().zip(wd.probs.iter().copied()))
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    let params = SamplingParams { temperature: 0.0, top_p: None, seed: 0, max_new_tokens: 16 };
    let greedy = |e: &Engine, ids: &[u32]| -> Result<Vec<u32>> {
        Ok(e.generate(ids, &[Intervention::none()], &params, true, &cancel, &mut |_, _, _| true)?.remove(0).tokens)
    };
    // The first prompt the CPU answers with at least 8 tokens (a random model may end its
    // answer at once, which would compare nothing), else the one it answers longest.
    let mut chosen: Option<(&str, Vec<u32>, Vec<u32>)> = None;
    for text in GREEDY_PROMPTS {
        let ids = cpu.tok.encode_prompt(text)?;
        let answer = greedy(&cpu, &ids)?;
        if chosen.as_ref().is_none_or(|c| answer.len() > c.2.len()) {
            chosen = Some((text, ids, answer));
        }
        if chosen.as_ref().is_some_and(|c| c.2.len() >= 8) {
            break;
        }
    }
    let (greedy_prompt, ids, gc) = chosen.expect("GREEDY_PROMPTS is not empty");
    let gd = greedy(&dev, &ids)?;
    // Answers agree if they do not part, part at a near-tie, or (bf16, f16) part late enough.
    let agrees = |c: &[u32], parting: &Option<Parting>| {
        parting.is_none_or(|p| p.near_tie || (tol.greedy_prefix != usize::MAX && p.at >= tol.greedy_prefix.min(c.len())))
    };
    let common_prefix = |c: &[u32], parting: &Option<Parting>| parting.map_or(c.len(), |p| p.at);
    let greedy_parting = parting(&cpu, &dev, &ids, &Intervention::none(), &gc, &gd, &tol)?;
    // An empty answer compares nothing: that is no pass.
    let greedy_pass = !gc.is_empty() && agrees(&gc, &greedy_parting);
    let prefix = common_prefix(&gc, &greedy_parting);
    let sweep_pass = sweep_max_abs_err <= tol.sweep_abs;

    // That neuron's detail: every view's top tokens, decoded on each side's device.
    // The device's top 10 against the CPU's top 20, so that a token tied across the 10th rank
    // is still found on the CPU's side.
    let detail = |e: &Engine, n: usize| crate::analysis::neuron_detail(e, hit.layer, hit.neuron, true, n, shared::Scale::Raw);
    let (dc, dd) = (detail(&cpu, 20)?, detail(&dev, 10)?);
    let (mut detail_max_logprob_err, mut detail_unexplained) = (0f64, 0usize);
    let lp = |t: &shared::TokenScore| (t.prob as f64).ln();
    for (vc, vd) in dc.views.iter().zip(&dd.views) {
        for (c, d) in vc.tokens.iter().zip(&vd.tokens) {
            let scale = lp(c).abs().max(1.0);
            // A NaN (a probability that is not one) is an infinite error: it fails.
            detail_max_logprob_err = detail_max_logprob_err.max(rel(lp(d), lp(c)));
            let near_tie = vc.tokens.iter().any(|n| n.id == d.id && (lp(n) - lp(c)).abs() <= 2.0 * tol.value_rel * scale);
            if c.id != d.id && !near_tie {
                detail_unexplained += 1;
            }
        }
    }
    let detail_pass = detail_unexplained == 0 && detail_max_logprob_err <= tol.value_rel && dc.views.len() == dd.views.len();

    // The server's batch on the device: each request against the CPU's answer to it alone.
    let clamp = Intervention { clamps: vec![crate::model::Clamp { layer: hit.layer, neuron: hit.neuron, value: 4.0 }] };
    // A second prompt of its own, of another length (the greedy one may be "a").
    let short = if greedy_prompt == "a" { "hello world" } else { "a" };
    let requests = [(greedy_prompt, Intervention::none()), (short, Intervention::none()), ("once upon a time there was a", clamp)];
    let dev = std::sync::Arc::new(dev);
    let (device_answers, batch_jobs_per_step) = batched(&dev, &requests, &params)?;
    let (mut batch_common_prefix, mut batch_partings) = (vec![], vec![]);
    let mut batch_pass = true;
    for (i, ((text, row), d)) in requests.iter().zip(&device_answers).enumerate() {
        let ids = cpu.tok.encode_prompt(text)?;
        // The first request is the single greedy one: the CPU's answer to it is `gc`.
        let c = if i == 0 {
            gc.clone()
        } else {
            cpu.generate(&ids, std::slice::from_ref(row), &params, true, &cancel, &mut |_, _, _| true)?.remove(0).tokens
        };
        let part = parting(&cpu, &dev, &ids, row, &c, d, &tol)?;
        batch_pass &= agrees(&c, &part);
        batch_common_prefix.push(common_prefix(&c, &part));
        batch_partings.push(part);
    }
    let pass = maps.iter().all(|m| m.pass) && search_pass && sweep_pass && greedy_pass && detail_pass && batch_pass;
    Ok(ModelCheck {
        model: path.display().to_string(),
        weights: dev.weights_desc(),
        device: format!("{device:?}"),
        tolerance: tol,
        maps,
        search_token: cpu.tok.token_text(token),
        search_top_cpu: key(&sc.top[0]),
        search_top_device: key(&sd.top[0]),
        search_pass,
        sweep_max_abs_err,
        sweep_pass,
        greedy_prompt: greedy_prompt.to_owned(),
        greedy_cpu: gc,
        greedy_device: gd,
        greedy_common_prefix: prefix,
        greedy_parting,
        greedy_pass,
        detail_max_logprob_err,
        detail_unexplained,
        detail_pass,
        batch_common_prefix,
        batch_partings,
        batch_jobs_per_step,
        batch_pass,
        fused_decode_blocks: dev.model.fused_blocks(),
        graph_replays: crate::model::graph::replays() - replays_before,
        pass,
    })
}

/// `requests` (a prompt and a row's intervention each) submitted at once to a [`Batcher`] on
/// `engine`'s device: each one's greedy tokens, and the jobs per shared step.
///
/// [`Batcher`]: crate::batch::Batcher
fn batched(engine: &std::sync::Arc<Engine>, requests: &[(&str, Intervention)], params: &SamplingParams) -> Result<(Vec<Vec<u32>>, f64)> {
    use crate::batch::{Batcher, Job};
    let batch = Batcher::new(engine.clone());
    let mut answers = vec![];
    for (text, row) in requests {
        let (job, outcome) = Job::plain(engine.tok.encode_prompt(text)?, vec![row.clone()], vec![0], params.clone());
        batch.submit(job);
        answers.push(outcome);
    }
    let tokens = answers.into_iter().map(|o| Ok(o.wait()?.remove(0).tokens)).collect::<Result<Vec<_>>>()?;
    let (steps, job_steps) = batch.steps();
    Ok((tokens, job_steps as f64 / steps.max(1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{write_hf_dir, TinySpec};

    /// On the CPU against itself everything agrees exactly; a map with one neuron's top tokens
    /// swapped beyond a tie is caught.
    #[test]
    fn cpu_against_itself_passes_and_a_wrong_map_fails() {
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(&TinySpec { scale: 3.0, ..Default::default() }, dir.path()).unwrap();
        let r = check_model(dir.path(), &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
        assert!(r.pass, "{r:#?}");
        assert_eq!(r.maps[0].lse_max_rel_err, 0.0);
        assert_eq!(r.greedy_cpu, r.greedy_device);
        assert!(r.detail_pass && r.detail_max_logprob_err == 0.0 && r.detail_unexplained == 0, "{r:#?}");
        assert!(!r.greedy_cpu.is_empty());
        // The batch on the "device" answers each request as the CPU does alone.
        assert!(r.batch_pass && r.batch_common_prefix.iter().all(|&p| p > 0), "{r:#?}");

        let e = Engine::load(dir.path(), &LoadOptions::default()).unwrap();
        // Answers that part: where, and the gap between the two choices in the logits there;
        // against itself the logits do not differ, so no parting is a near-tie.
        let tol = Tolerance::for_dtype(DType::F32);
        let ids = e.tok.encode_prompt(&r.greedy_prompt).unwrap();
        let none = Intervention::none();
        let c = r.greedy_cpu.clone();
        assert_eq!(parting(&e, &e, &ids, &none, &c, &c, &tol).unwrap(), None);
        let context: Vec<u32> = ids.iter().chain(&c[..2]).copied().collect();
        let next = e.next_token(&context, &none, 2, &Cancel::default()).unwrap();
        assert_eq!(next[0].id, c[2]);
        let mut d = c.clone();
        d[2] = next[1].id;
        let p = parting(&e, &e, &ids, &none, &c, &d, &tol).unwrap().unwrap();
        assert_eq!((p.at, p.logit_err, p.near_tie), (2, 0.0, false), "{p:?}");
        assert!((p.gap - (next[0].logit - next[1].logit) as f64).abs() < 1e-6 && p.gap > 0.0, "{p:?} {next:?}");
        // One answer stopping early parts at no near-tie.
        let p = parting(&e, &e, &ids, &none, &c, &c[..3], &tol).unwrap().unwrap();
        assert_eq!((p.at, p.gap, p.near_tie), (3, f64::INFINITY, false));

        let m = NeuronMap::build(&*e.model, View::Up, false, "t", "f32", &|_, _| {}).unwrap();
        let mut bad = m.clone();
        let k = m.meta.k;
        bad.pos.ids.swap(0, k - 1);
        let tol = Tolerance::for_dtype(DType::F32);
        let a = compare_maps(&m, &bad, &tol, tol.value_rel);
        assert_eq!(a.id_mismatches, 2);
        assert!(a.unexplained > 0 && !a.pass, "{a:?}");
        let mut off = m.clone();
        off.neg.lse[3] += 0.01;
        assert!(!compare_maps(&m, &off, &tol, tol.value_rel).pass);
    }

    /// The untied tiny Llama of `gpu-check` ends its answer to the first prompt at once; the
    /// check moves on to a prompt it answers, so the greedy comparison still compares tokens.
    #[test]
    fn greedy_answers_compared_are_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(&TinySpec { scale: 3.0, tied: false, n_layers: 2, d_ff: 300, ..Default::default() }, dir.path()).unwrap();
        let e = Engine::load(dir.path(), &LoadOptions::default()).unwrap();
        let params = SamplingParams { temperature: 0.0, top_p: None, seed: 0, max_new_tokens: 16 };
        let answer = |text: &str| {
            let ids = e.tok.encode_prompt(text).unwrap();
            e.generate(&ids, &[Intervention::none()], &params, true, &Cancel::default(), &mut |_, _, _| true).unwrap().remove(0).tokens
        };
        assert!(answer(GREEDY_PROMPTS[0]).is_empty(), "the first prompt is answered at once");
        let r = check_model(dir.path(), &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
        assert!(r.pass && r.greedy_prompt != GREEDY_PROMPTS[0], "{r:#?}");
        assert_eq!(r.greedy_cpu, answer(&r.greedy_prompt));
        assert!(!r.greedy_cpu.is_empty() && r.greedy_cpu == r.greedy_device, "{r:#?}");
    }

    /// The GPU's arithmetic for a bf16 map with the final norm, done on the CPU: the directions
    /// times the norm split into two bf16 parts (`map::split_directions`), each multiplied with
    /// the unembedding as stored (`map::gpu`), where the CPU folds the norm into the
    /// unembedding in f32. On the models `device-check` uses, the two maps must agree within its
    /// bf16 tolerances, or a correct GPU would be reported out of tolerance. (The products of
    /// bf16 values are exact in f32 on both sides, so only the summation order is left out
    /// here.) Rounding the normed directions to bf16 once instead, as the GPU map first did,
    /// fails this: logsumexps 1.4e-3 apart, top logits 2%, a tenth of the top ids reordered.
    #[test]
    fn the_bf16_final_norm_tolerance_covers_the_gpus_rounding() {
        let tmp = tempfile::tempdir().unwrap();
        let mut dirs = vec![];
        for (name, spec) in [
            ("tiny-llama", TinySpec { scale: 3.0, ..Default::default() }),
            ("tiny-llama-untied", TinySpec { scale: 3.0, tied: false, n_layers: 2, d_ff: 300, ..Default::default() }),
            ("tiny-gemma3", TinySpec { scale: 3.0, gemma3: true, n_layers: 4, ..Default::default() }),
            ("tiny-qwen2", TinySpec { scale: 3.0, qwen: Some(crate::synthetic::Qwen::V2), ..Default::default() }),
        ] {
            write_hf_dir(&spec, &tmp.path().join(name)).unwrap();
            dirs.push(tmp.path().join(name));
        }
        let shape = crate::synth::shape("smollm2-135m").unwrap();
        crate::synth::write(&shape, 1, safetensors::Dtype::BF16, 0, &tmp.path().join("smollm2"), &|_, _| {}).unwrap();
        dirs.push(tmp.path().join("smollm2"));
        let tol = Tolerance::for_dtype(DType::BF16);
        for dir in dirs {
            let e = Engine::load(&dir, &LoadOptions { mode: WeightMode::Dense(DType::BF16), ..Default::default() }).unwrap();
            let model = &*e.model;
            let cpu = NeuronMap::build(model, View::Up, true, "t", "bf16", &|_, _| {}).unwrap();
            let g = model.final_norm_weight().to_dtype(DType::F32).unwrap();
            let rounded = |l: usize| -> Result<candle_core::Tensor> {
                let parts = crate::map::split_directions(&crate::map::directions(model, View::Up, l)?.broadcast_mul(&g)?, DType::BF16)?;
                let mut sum = parts[0].to_dtype(DType::F32)?;
                for p in &parts[1..] {
                    sum = (sum + p.to_dtype(DType::F32)?)?;
                }
                Ok(sum)
            };
            let head = model.lm_head_weight().unwrap();
            let gpu = NeuronMap::build_with(model.config(), head, None, &rounded, View::Up, true, "t", "bf16", &|_, _| {}).unwrap();
            let a = compare_maps(&cpu, &gpu, &tol, tol.value_rel);
            eprintln!("{}: {a:?}", dir.display());
            assert!(a.pass, "{}: {a:#?}", dir.display());
        }
    }
}
