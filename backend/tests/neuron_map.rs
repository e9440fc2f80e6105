//! The neuron map, concept search, neuron detail and model comparison on tiny random models,
//! against a brute-force full softmax and identities that must hold.

use candle_core::{Device, IndexOp, Tensor};
use flash_interp::analysis;
use flash_interp::engine::{Engine, LoadOptions, MapOrigin};
use flash_interp::map::{self, NeuronMap};
use flash_interp::model::{Cache, Intervention};
use flash_interp::synthetic::{self, Plant, TinySpec};
use flash_interp::Cancel;
use shared::{Concept, Moments, NeuronClass, Polarity, PromptSpec, Scale, VerifyRequest, View};

struct Tiny {
    dir: tempfile::TempDir,
    engine: Engine,
}

fn tiny(spec: &TinySpec, name: &str) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.gguf"));
    synthetic::write_gguf(spec, &path).unwrap();
    let mut engine = Engine::load(&path, &LoadOptions::default()).unwrap();
    engine.cache_dir = dir.path().join("cache");
    Tiny { dir, engine }
}

fn build(e: &Engine, view: View, final_norm: bool) -> std::sync::Arc<NeuronMap> {
    e.map(view, final_norm, &|_, _| {}).unwrap().0
}

/// Every logit of every neuron of `view`, in f64: `[n_neurons][vocab]`.
fn brute_logits(e: &Engine, view: View, final_norm: bool) -> Vec<Vec<f64>> {
    let wu: Vec<Vec<f32>> = map::unembedding(&*e.model, final_norm).unwrap().to_vec2().unwrap();
    let mut out = Vec::new();
    for l in 0..e.config().n_layers {
        let dirs: Vec<Vec<f32>> = map::directions(&*e.model, view, l).unwrap().to_vec2().unwrap();
        for w in dirs {
            out.push(wu.iter().map(|u| u.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()).collect());
        }
    }
    out
}

fn lse(v: &[f64]) -> f64 {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// The paper's normalised probability p(t) / mean(top-100 p) of every token, with a full
/// softmax of the logits times `sign` (the polarity).
fn brute_normalised(logits: &[f64], sign: f64) -> Vec<f64> {
    let v: Vec<f64> = logits.iter().map(|x| sign * x).collect();
    let z = lse(&v);
    let probs: Vec<f64> = v.iter().map(|x| (x - z).exp()).collect();
    let mean_top: f64 = sorted_desc(&probs)[..100].iter().map(|&j| probs[j]).sum::<f64>() / 100.0;
    probs.iter().map(|p| p / mean_top).collect()
}

fn sorted_desc(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx
}

#[test]
fn map_equals_brute_force_softmax_for_every_view() {
    let t = tiny(&TinySpec::default(), "tiny");
    for view in View::ALL {
        for final_norm in [false, true] {
            let m = build(&t.engine, view, final_norm);
            assert_eq!((m.meta.view, m.meta.final_norm, m.meta.k), (view, final_norm, 100));
            for (i, logits) in brute_logits(&t.engine, view, final_norm).iter().enumerate() {
                for p in [Polarity::Pos, Polarity::Neg] {
                    let v: Vec<f64> = logits.iter().map(|x| p.sign() as f64 * x).collect();
                    let full = lse(&v);
                    let order = sorted_desc(&v);
                    let table = m.table(p);
                    assert!((table.lse[i] as f64 - full).abs() < 1e-4, "{view:?} {p:?} neuron {i}: lse");
                    let top100: Vec<f64> = order[..100].iter().map(|&j| v[j]).collect();
                    assert!((table.lse_top[i] as f64 - lse(&top100)).abs() < 1e-4);
                    let (ids, probs) = m.top(p, i / m.meta.d_ff, i % m.meta.d_ff);
                    for (r, (&id, &prob)) in ids.iter().zip(probs).enumerate() {
                        let want = order[r];
                        // Same token, or one whose logit ties with it within float error.
                        assert!(id as usize == want || (v[id as usize] - v[want]).abs() < 1e-4, "{view:?} {p:?} neuron {i} rank {r}");
                        assert!((prob as f64 - (v[id as usize] - full).exp()).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

/// Every view, with and without the final norm, of f32 weights and of Q8_0 blocks held exact
/// (multiplied in place, never made dense): the brute-force softmax's scores.
#[test]
fn search_of_every_view_and_weight_mode_is_the_normalised_probability() {
    let tokens = [40u32, 263];
    for spec in [TinySpec::default(), TinySpec { q8: true, ..Default::default() }] {
        let t = tiny(&spec, "tiny");
        for view in View::ALL {
            for final_norm in [false, true] {
                let r = analysis::search(&t.engine, &build(&t.engine, view, final_norm), &tokens, 5).unwrap();
                for (i, logits) in brute_logits(&t.engine, view, final_norm).iter().enumerate() {
                    for (p, got) in [(1.0, r.pos[i]), (-1.0, r.neg[i])] {
                        let norm = brute_normalised(logits, p);
                        let want: f64 = tokens.iter().map(|&t| norm[t as usize]).sum();
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * want.max(1.0),
                            "q8 {} {view:?} norm {final_norm} neuron {i}: {got} vs {want}",
                            spec.q8
                        );
                    }
                }
            }
        }
    }
}

/// Population standard deviation of a neuron's logits over the vocabulary.
fn std_of(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// `Scale::Std`: the normalised probability of each neuron's logits divided by their own standard
/// deviation (computed here from the full logits, not from the map's moments), for alternatives
/// and for a phrase, in every view.
#[test]
fn std_scaled_search_is_the_normalised_probability_of_standardised_logits() {
    let t = tiny(&TinySpec::default(), "tiny");
    let tokens = [40u32, 263];
    for view in View::ALL {
        let m = build(&t.engine, view, false);
        for phrase in [false, true] {
            let r = analysis::search_concept(&t.engine, &m, &tokens, phrase, 5, None, Scale::Std).unwrap();
            for (i, logits) in brute_logits(&t.engine, view, false).iter().enumerate() {
                let s = std_of(logits);
                let scaled: Vec<f64> = logits.iter().map(|x| x / s).collect();
                for (p, got) in [(1.0, r.pos[i]), (-1.0, r.neg[i])] {
                    let norm = brute_normalised(&scaled, p);
                    // Alternatives: the sum; a phrase: the geometric mean.
                    let want = match phrase {
                        false => tokens.iter().map(|&t| norm[t as usize]).sum::<f64>(),
                        true => (tokens.iter().map(|&t| norm[t as usize].ln()).sum::<f64>() / tokens.len() as f64).exp(),
                    };
                    assert!((got as f64 - want).abs() < 1e-3 * want.max(1.0), "{view:?} phrase {phrase} neuron {i} sign {p}: {got} vs {want}");
                }
            }
        }
    }
}

/// The same random model with every weight ×0.1 (logits ×0.01): the paper's raw scores flatten
/// toward 1 and the default scale turns to `std`, whose scores do not change at all (a neuron's
/// standardised logits do not depend on the size of its weights).
#[test]
fn std_scale_does_not_depend_on_the_size_of_the_weights() {
    let (a, b) = (tiny(&TinySpec::default(), "a"), tiny(&TinySpec { scale: TinySpec::default().scale * 0.1, ..Default::default() }, "b"));
    let (ma, mb) = (build(&a.engine, View::Up, false), build(&b.engine, View::Up, false));
    assert_eq!(analysis::default_scale(&ma), Scale::Raw, "median std {}", ma.median_std());
    assert_eq!(analysis::default_scale(&mb), Scale::Std, "median std {}", mb.median_std());
    // Verification pools views on one scale: σ as soon as one map is flat.
    assert_eq!(analysis::pool_scale(std::slice::from_ref(&ma)), Scale::Raw);
    assert_eq!(analysis::pool_scale(&[ma.clone(), mb.clone()]), Scale::Std);
    let tokens = [40u32];
    let search = |e: &Engine, m: &NeuronMap, scale| analysis::search_concept(e, m, &tokens, false, 5, None, scale).unwrap();
    let (sa, sb) = (search(&a.engine, &ma, Scale::Std), search(&b.engine, &mb, Scale::Std));
    for (x, y) in sa.pos.iter().chain(&sa.neg).zip(sb.pos.iter().chain(&sb.neg)) {
        assert!((x - y).abs() < 1e-3 * x.max(1.0), "{x} vs {y}");
    }
    assert_eq!(
        sa.top.iter().map(|h| (h.layer, h.neuron, h.polarity)).collect::<Vec<_>>(),
        sb.top.iter().map(|h| (h.layer, h.neuron, h.polarity)).collect::<Vec<_>>()
    );
    // Raw: the small model's scores are squeezed toward 1.
    let (ra, rb) = (search(&a.engine, &ma, Scale::Raw), search(&b.engine, &mb, Scale::Raw));
    let spread = |r: &analysis::SearchResult| r.pos.iter().map(|x| (x.ln()).abs()).fold(0f32, f32::max);
    assert!(spread(&rb) < 0.2 * spread(&ra), "raw spread {} vs {}", spread(&rb), spread(&ra));
}

#[test]
fn search_scores_are_the_normalised_probability() {
    let t = tiny(&TinySpec::default(), "tiny");
    let m = build(&t.engine, View::Up, false);
    let tokens = [40u32, 263];
    let r = analysis::search(&t.engine, &m, &tokens, 5).unwrap();
    assert_eq!(r.pos.len(), m.n_neurons());
    for (i, logits) in brute_logits(&t.engine, View::Up, false).iter().enumerate() {
        for (p, got) in [(1.0, r.pos[i]), (-1.0, r.neg[i])] {
            // p(t) / mean(top-100 p) with a full softmax, summed over the tokens.
            let norm = brute_normalised(logits, p);
            let want: f64 = tokens.iter().map(|&t| norm[t as usize]).sum();
            assert!((got as f64 - want).abs() < 1e-4 * want.max(1.0), "neuron {i} sign {p}: {got} vs {want}");
        }
    }
    // The top hits are ranked by their better polarity and say which it is.
    for w in r.top.windows(2) {
        assert!(w[0].score >= w[1].score);
    }
    let h = &r.top[0];
    let i = h.layer * m.meta.d_ff + h.neuron;
    assert_eq!(h.score, r.pos[i].max(r.neg[i]));
    assert_eq!(h.polarity, if r.pos[i] >= r.neg[i] { Polarity::Pos } else { Polarity::Neg });
    let signed = r.signed_layers(m.meta.d_ff);
    assert_eq!(signed.len(), t.engine.config().n_layers);
    assert!(signed.iter().flatten().all(|x| x.is_finite()));

    // One polarity only: its scores unchanged, the other's zero, hits ranked by it alone.
    for (only, own, other) in [(Polarity::Pos, &r.pos, &r.neg), (Polarity::Neg, &r.neg, &r.pos)] {
        let f = analysis::search_polarity(&t.engine, &m, &tokens, 5, Some(only)).unwrap();
        let (f_own, f_other) = if only == Polarity::Pos { (&f.pos, &f.neg) } else { (&f.neg, &f.pos) };
        assert_eq!(f_own, own);
        assert!(f_other.iter().all(|&x| x == 0.0) && other.iter().any(|&x| x > 0.0));
        let best = own.iter().cloned().fold(0f32, f32::max);
        assert_eq!(f.top[0].score, best);
        assert!(f.top.iter().all(|h| h.polarity == only));
        let s = f.signed_layers(m.meta.d_ff);
        assert!(s.iter().flatten().all(|&x| x * only.sign() >= 0.0));
    }
}

#[test]
fn negating_up_row_and_down_column_changes_nothing_but_swaps_polarities() {
    let neuron = (1, 5);
    let a = tiny(&TinySpec::default(), "a");
    let b = tiny(&TinySpec { negate: vec![neuron], ..Default::default() }, "b");
    let ids = [1u32, 40, 77, 263, 5];
    let x = Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let la: Vec<f32> = a.engine.model.forward(&x, &mut Cache::new(a.engine.config()), &[], &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap();
    let lb: Vec<f32> =
        b.engine.model.forward(&x, &mut Cache::new(b.engine.config()), &[Intervention::none()], &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap();
    let d = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(d < 1e-5, "logits moved by {d}");
    let (ma, mb) = (build(&a.engine, View::Up, false), build(&b.engine, View::Up, false));
    let (l, n) = neuron;
    assert_eq!(ma.top(Polarity::Pos, l, n).0, mb.top(Polarity::Neg, l, n).0);
    assert_eq!(ma.top(Polarity::Neg, l, n).0, mb.top(Polarity::Pos, l, n).0);
    let i = ma.index(l, n);
    assert!((ma.pos.lse[i] - mb.neg.lse[i]).abs() < 1e-5);
    // Other neurons are untouched.
    assert_eq!(ma.top(Polarity::Pos, l, n + 1).0, mb.top(Polarity::Pos, l, n + 1).0);
}

#[test]
fn cache_round_trips_and_corrupt_caches_are_rebuilt() {
    let t = tiny(&TinySpec::default(), "tiny");
    let (built, origin) = t.engine.map(View::Gate, true, &|_, _| {}).unwrap();
    assert!(matches!(origin, MapOrigin::Built(_)));
    let path = map::cache_path(&t.engine.cache_dir, &t.engine.info.name, t.engine.fingerprint().unwrap(), View::Gate, true);
    assert!(path.exists());
    // A fresh engine (nothing in memory) loads it from disk, identical.
    let reload = || {
        let mut e = Engine::load(&t.engine.info.path, &LoadOptions::default()).unwrap();
        e.cache_dir = t.engine.cache_dir.clone();
        e.map(View::Gate, true, &|_, _| {}).unwrap()
    };
    let (cached, origin) = reload();
    assert_eq!(origin, MapOrigin::Cache);
    assert_eq!(*cached, *built);
    let good = std::fs::read(&path).unwrap();
    // A flipped byte, a truncated file, garbage: each is rejected and rebuilt, never trusted.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    for bad in [flipped, good[..good.len() - 100].to_vec(), b"garbage".to_vec()] {
        std::fs::write(&path, &bad).unwrap();
        let err = map::cache::load(&path, &built.meta).unwrap_err();
        assert!(matches!(err, flash_interp::Error::Cache { .. }), "{err}");
        let (m, origin) = reload();
        assert!(matches!(origin, MapOrigin::Built(_)));
        assert_eq!(*m, *built);
        assert_eq!(std::fs::read(&path).unwrap(), good, "the rebuilt cache is written back");
    }
    // A cache built for other options is stale.
    let mut other = built.meta.clone();
    other.model_fingerprint = "0".repeat(64);
    assert!(map::cache::load(&path, &other).is_err());
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&t.engine.cache_dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.path() != path).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(t.dir);
}

#[test]
fn neuron_detail_agrees_with_the_map_and_brute_force() {
    neuron_detail_case(&TinySpec::default());
}

/// The same with Q8_0 weights, held as quantized blocks (`exact`): one neuron's rows and column
/// are dequantized alone and the similarity scan multiplies the blocks in place.
#[test]
fn neuron_detail_of_quantized_weights_agrees_with_the_map_and_brute_force() {
    neuron_detail_case(&TinySpec { q8: true, ..Default::default() });
}

fn neuron_detail_case(spec: &TinySpec) {
    let t = tiny(spec, "tiny");
    assert_eq!(t.engine.weight_mode() == flash_interp::model::WeightMode::Exact, spec.q8);
    let m = build(&t.engine, View::Up, false);
    let (l, n) = (2, 11);
    let d = analysis::neuron_detail(&t.engine, l, n, false, 10, Scale::Raw).unwrap();
    assert_eq!(d.views.len(), 6);
    let up_pos = d.views.iter().find(|v| v.view == View::Up && v.polarity == Polarity::Pos).unwrap();
    let ids: Vec<u32> = up_pos.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, m.top(Polarity::Pos, l, n).0[..10].to_vec());
    let first = &up_pos.tokens[0];
    let i = m.index(l, n);
    let want_norm = (first.prob.ln() - m.log_mean_top(Polarity::Pos, i)).exp();
    assert!((first.norm - want_norm).abs() < 1e-3 * want_norm);
    // Similar neurons: brute-force cosine of up rows, the neuron itself excluded.
    let up: Vec<Vec<f32>> =
        (0..t.engine.config().n_layers).flat_map(|l| map::directions(&*t.engine.model, View::Up, l).unwrap().to_vec2::<f32>().unwrap()).collect();
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    let mut want: Vec<(usize, f32)> = (0..up.len()).filter(|&j| j != i).map(|j| (j, cos(&up[i], &up[j]))).collect();
    want.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    for (s, (j, c)) in d.similar.iter().zip(&want) {
        assert_eq!(s.layer * t.engine.config().d_ff + s.neuron, *j);
        assert!((s.cosine - c).abs() < 1e-4);
    }
    // Activation statistics are ordered and finite.
    let a = d.activation;
    assert!(a.positions > 0 && a.min <= a.mean && a.mean <= a.max && a.std >= 0.0);
    // Weight statistics of the views whose maps are built (only up here), as the map has them.
    assert_eq!(d.classes.len(), 1);
    assert_eq!(d.classes[0].view, View::Up);
    assert_eq!(d.classes[0].moments, analysis::moments(&m, i));
    assert_eq!(d.classes[0].class, analysis::classify(&m)[i]);
    assert!(analysis::neuron_detail(&t.engine, 3, 0, false, 10, Scale::Raw).is_err());
    assert!(analysis::neuron_detail(&t.engine, 0, 64, false, 10, Scale::Raw).is_err());

    // Scale::Std: the same tokens and probabilities; each view's normalised probabilities are
    // those of its logits over their standard deviation (brute force), and equal the std-scaled
    // search's score of the same token.
    let ds = analysis::neuron_detail(&t.engine, l, n, false, 10, Scale::Std).unwrap();
    assert_eq!(ds.scale, Scale::Std);
    for (v, raw) in ds.views.iter().zip(&d.views) {
        let logits = &brute_logits(&t.engine, v.view, false)[i];
        let s = std_of(logits);
        let norm = brute_normalised(&logits.iter().map(|x| x / s).collect::<Vec<_>>(), v.polarity.sign() as f64);
        for (a, b) in v.tokens.iter().zip(&raw.tokens) {
            assert_eq!((a.id, a.prob), (b.id, b.prob));
            let want = norm[a.id as usize];
            assert!((a.norm as f64 - want).abs() < 1e-3 * want.max(1.0), "{:?} {:?}: {} vs {want}", v.view, v.polarity, a.norm);
        }
    }
    // The map gives the same bars from its stored top tokens.
    let from_map = m.normalised_top(Polarity::Pos, l, n, Scale::Std);
    let std_up_pos = &ds.views.iter().find(|v| v.view == View::Up && v.polarity == Polarity::Pos).unwrap().tokens;
    for (t, got) in std_up_pos.iter().zip(&from_map) {
        assert!((got - t.norm).abs() < 1e-3 * t.norm.max(1.0), "{got} vs {}", t.norm);
    }
    for (t, got) in up_pos.tokens.iter().zip(m.normalised_top(Polarity::Pos, l, n, Scale::Raw)) {
        assert!((got - t.norm).abs() < 1e-3 * t.norm.max(1.0), "{got} vs {}", t.norm);
    }
    let top = up_pos.tokens[0].id;
    let r = analysis::search_concept(&t.engine, &m, &[top], false, 1, Some(Polarity::Pos), Scale::Std).unwrap();
    let std_first = &ds.views.iter().find(|v| v.view == View::Up && v.polarity == Polarity::Pos).unwrap().tokens[0];
    assert!((r.pos[i] - std_first.norm).abs() < 1e-3 * std_first.norm, "{} vs {}", r.pos[i], std_first.norm);

    // Every view and polarity, with and without the final norm (folded into the direction on
    // the model's device, where the map folds it into its f32 copy of W_U): the map's top
    // tokens, in order, with its probabilities.
    for final_norm in [false, true] {
        let d = analysis::neuron_detail(&t.engine, l, n, final_norm, 10, Scale::Raw).unwrap();
        for v in &d.views {
            let m = build(&t.engine, v.view, final_norm);
            let (ids, probs) = m.top(v.polarity, l, n);
            let got: Vec<u32> = v.tokens.iter().map(|t| t.id).collect();
            assert_eq!(got, ids[..10].to_vec(), "{:?} {:?} final_norm {final_norm}", v.view, v.polarity);
            for (t, &p) in v.tokens.iter().zip(probs) {
                assert!((t.prob - p).abs() <= 1e-5 * p.max(1e-3), "{:?} {:?}: {} vs {p}", v.view, v.polarity, t.prob);
            }
        }
    }
}

#[test]
fn compare_models_finds_the_perturbed_neurons() {
    let changed = vec![(0, 3), (1, 40), (2, 7)];
    let a = tiny(&TinySpec::default(), "base");
    let b = tiny(&TinySpec { perturb: changed.clone(), ..Default::default() }, "instruct");
    let (ma, mb) = (build(&a.engine, View::Up, false), build(&b.engine, View::Up, false));
    let r = analysis::compare_models(&a.engine, &b.engine, &ma, &mb, 3).unwrap();
    let mut found: Vec<(usize, usize)> = r.changed.iter().map(|c| (c.layer, c.neuron)).collect();
    found.sort();
    assert_eq!(found, changed);
    // The share of unchanged top tokens, against a brute-force argmax of each model's logits.
    let (la, lb) = (brute_logits(&a.engine, View::Up, false), brute_logits(&b.engine, View::Up, false));
    let d_ff = a.engine.config().d_ff;
    for layer in &r.layers {
        let same = (0..d_ff)
            .filter(|&n| {
                let i = layer.layer * d_ff + n;
                sorted_desc(&la[i])[0] == sorted_desc(&lb[i])[0]
            })
            .count();
        assert_eq!(layer.same_top, same, "layer {}", layer.layer);
        assert!(layer.share > 0.9 && layer.share <= 1.0);
    }
    // Every other neuron is identical: it keeps its top token.
    assert!(r.overall_share >= 1.0 - changed.len() as f32 / (3.0 * d_ff as f32));
    // Models of different shapes are refused.
    let c = tiny(&TinySpec { d_ff: 32, ..Default::default() }, "other");
    let mc = build(&c.engine, View::Up, false);
    assert!(analysis::compare_models(&a.engine, &c.engine, &ma, &mc, 3).is_err());
}

#[test]
fn concurrent_map_requests_share_one_build() {
    let t = tiny(&TinySpec::default(), "tiny");
    let origins: Vec<MapOrigin> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| t.engine.map(View::Down, false, &|_, _| {}).unwrap().1)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let built = origins.iter().filter(|o| matches!(o, MapOrigin::Built(_))).count();
    assert_eq!(built, 1, "{origins:?}");
    assert!(origins.iter().all(|o| matches!(o, MapOrigin::Built(_) | MapOrigin::Memory)));
}

/// Moments of every neuron's logits, two-pass in f64.
fn brute_moments(logits: &[f64]) -> (f64, f64, f64, f64) {
    let n = logits.len() as f64;
    let mean = logits.iter().sum::<f64>() / n;
    let c = |p: i32| logits.iter().map(|x| (x - mean).powi(p)).sum::<f64>() / n;
    (mean, c(2).sqrt(), c(3) / c(2).powf(1.5), c(4) / (c(2) * c(2)))
}

/// A tiny model with a prediction neuron (down column = +U[t]) and a suppression neuron
/// (down column = -U[t]); d = 128 so that one token stands ~11σ above the rest.
fn classed_spec() -> TinySpec {
    TinySpec {
        d_model: 128,
        plant: vec![
            Plant { layer: 2, neuron: 9, tokens: vec![70], up: None, down: Some(1.0) },
            Plant { layer: 1, neuron: 4, tokens: vec![120], up: None, down: Some(-1.0) },
        ],
        ..Default::default()
    }
}

#[test]
fn map_moments_equal_brute_force_and_classes_follow_gurnee() {
    let t = tiny(&classed_spec(), "classed");
    for view in View::ALL {
        let m = build(&t.engine, view, false);
        let brute: Vec<(f64, f64, f64, f64)> = brute_logits(&t.engine, view, false).iter().map(|l| brute_moments(l)).collect();
        for (i, &(mean, std, skew, kurt)) in brute.iter().enumerate() {
            let got = analysis::moments(&m, i);
            assert!((got.mean as f64 - mean).abs() < 1e-4 * std, "{view:?} {i}: mean {} vs {mean}", got.mean);
            assert!((got.std as f64 / std - 1.0).abs() < 1e-4, "{view:?} {i}: std {} vs {std}", got.std);
            assert!((got.skew as f64 - skew).abs() < 1e-3, "{view:?} {i}: skew {} vs {skew}", got.skew);
            assert!((got.kurtosis as f64 / kurt - 1.0).abs() < 1e-3, "{view:?} {i}: kurtosis {} vs {kurt}", got.kurtosis);
        }
        // Classes from the brute-force moments and median, where no threshold is within 1%.
        let mut stds: Vec<f64> = brute.iter().map(|b| b.1).collect();
        stds.sort_by(f64::total_cmp);
        let med = stds[stds.len() / 2];
        let classes = analysis::classify(&m);
        for (i, &(_, std, skew, kurt)) in brute.iter().enumerate() {
            let near = (kurt / 10.0 - 1.0).abs() < 0.01 || (std / (2.0 * med) - 1.0).abs() < 0.01;
            if !near {
                let want = NeuronClass::of(&Moments { mean: 0.0, std: std as f32, skew: skew as f32, kurtosis: kurt as f32 }, med as f32);
                assert_eq!(classes[i], want, "{view:?} neuron {i}");
            }
        }
    }
    // The planted neurons are what they were built to be, in the down view, and listed so.
    let m = build(&t.engine, View::Down, false);
    let classes = analysis::classify(&m);
    assert_eq!(classes[m.index(2, 9)], NeuronClass::Prediction);
    assert_eq!(classes[m.index(1, 4)], NeuronClass::Suppression);
    let r = analysis::classes(&t.engine, &m, NeuronClass::Prediction, 5).unwrap();
    assert_eq!((r.neurons[0].layer, r.neurons[0].neuron), (2, 9));
    assert_eq!(r.neurons[0].top_tokens[0], t.engine.tok.token_text(70));
    let s = analysis::classes(&t.engine, &m, NeuronClass::Suppression, 5).unwrap();
    assert_eq!((s.neurons[0].layer, s.neurons[0].neuron), (1, 4));
    // Suppression neurons list the tokens they push down: their negative polarity's top.
    assert_eq!(s.neurons[0].top_tokens[0], t.engine.tok.token_text(120));
    for (l, c) in r.layers.iter().enumerate() {
        let row = &classes[l * m.meta.d_ff..(l + 1) * m.meta.d_ff];
        let count = |k| row.iter().filter(|&&x| x == k).count();
        assert_eq!(
            (c.prediction, c.suppression, c.partition),
            (count(NeuronClass::Prediction), count(NeuronClass::Suppression), count(NeuronClass::Partition))
        );
    }
    assert!(r.layers[2].prediction >= 1 && r.layers[1].suppression >= 1);
}

#[test]
fn phrase_search_is_the_geometric_mean_and_needs_every_token() {
    let (a, b) = (70u32, 120u32);
    let spec = TinySpec {
        plant: vec![
            // Reads only the first token of the phrase, strongly.
            Plant { layer: 1, neuron: 3, tokens: vec![a], up: Some(2.0), down: None },
            // Reads both tokens of the phrase.
            Plant { layer: 2, neuron: 7, tokens: vec![a, b], up: Some(1.0), down: None },
        ],
        ..Default::default()
    };
    let t = tiny(&spec, "phrase");
    let m = build(&t.engine, View::Up, false);
    let r = analysis::search_phrase(&t.engine, &m, &[a, b], 5, None).unwrap();
    for (i, logits) in brute_logits(&t.engine, View::Up, false).iter().enumerate() {
        for (p, got) in [(1.0, r.pos[i]), (-1.0, r.neg[i])] {
            let norm = brute_normalised(logits, p);
            let want = (norm[a as usize] * norm[b as usize]).sqrt();
            assert!((got as f64 / want - 1.0).abs() < 1e-3, "neuron {i} sign {p}: {got} vs {want}");
        }
    }
    // The neuron that reads the whole phrase comes first; the one that reads " a" alone does not,
    // though it is the alternatives search's first for the same tokens.
    assert_eq!((r.top[0].layer, r.top[0].neuron), (2, 7));
    let any = analysis::search(&t.engine, &m, &[a, b], 5).unwrap();
    assert_eq!((any.top[0].layer, any.top[0].neuron), (1, 3));
    // A one-token phrase is the single-token search.
    let one = analysis::search_phrase(&t.engine, &m, &[a], 5, None).unwrap();
    let single = analysis::search(&t.engine, &m, &[a], 5).unwrap();
    for (x, y) in one.pos.iter().zip(&single.pos) {
        assert!((x - y).abs() <= 1e-5 * y.max(1.0));
    }
}

/// A tiny model where the causal answer is known by construction: neuron 1:10 writes `tokens`
/// (its down column) and reads nothing special; neuron 2:20 reads them (its up row: the map's
/// favourite in the up view) and writes nothing (a zero down column).
fn verify_model(tokens: Vec<u32>) -> Tiny {
    let spec = TinySpec {
        plant: vec![
            Plant { layer: 1, neuron: 10, tokens: tokens.clone(), up: None, down: Some(1.0) },
            Plant { layer: 2, neuron: 20, tokens, up: Some(2.0), down: Some(0.0) },
        ],
        ..Default::default()
    };
    tiny(&spec, "verify")
}

fn plain(text: &str) -> PromptSpec {
    PromptSpec { text: text.into(), chat: Some(false), messages: None }
}

#[test]
fn verify_finds_the_planted_writer_and_measures_what_a_sweep_measures() {
    let probe = tiny(&TinySpec::default(), "probe");
    let target = probe.engine.tok.single_token(" the").unwrap();
    let t = verify_model(vec![target]);
    let e = &t.engine;
    let maps: Vec<_> = View::ALL.iter().map(|&v| build(e, v, false)).collect();
    let req = VerifyRequest {
        concept: Concept::Tokens(vec![" the".into()]),
        prompts: vec![plain("in a dog"), plain("hello there")],
        candidates: 6,
        values: 5,
        range: 10.0,
    };
    let plan = analysis::VerifyPlan::new(e, &req).unwrap();
    let r = analysis::verify(e, &maps, &plan, &Cancel::default()).unwrap();
    assert_eq!(r.neurons.len(), 6);
    assert_eq!(r.scale, Scale::Raw, "the tiny model's map scores are the paper's");
    // The map's candidates include both planted neurons, each found through its planted side.
    let find = |l, n| r.neurons.iter().find(|v| (v.layer, v.neuron) == (l, n)).unwrap_or_else(|| panic!("{l}:{n} not a candidate"));
    let (writer, decoy) = (find(1, 10), find(2, 20));
    assert_eq!((writer.view, decoy.view), (View::Down, View::Up));
    // The writer is the causal first, raising p(" the") when clamped high; the decoy does nothing.
    assert_eq!((r.neurons[0].layer, r.neurons[0].neuron), (1, 10));
    assert!(writer.effect > 1.0 && writer.best_value > 0.0, "{writer:?}");
    assert!(decoy.effect.abs() < 1e-4, "{decoy:?}");
    for w in r.neurons.windows(2) {
        assert!(w[0].effect >= w[1].effect);
    }
    // The curve is what the sweep measures, prompt by prompt, averaged.
    let values: Vec<f32> = writer.curve.iter().map(|p| p.value).collect();
    let (mut base, mut mean) = (0.0, vec![0.0; values.len()]);
    for p in &req.prompts {
        let ids = e.prompt_ids(p).unwrap();
        let s = e.sweep(&ids, 1, 10, target, &values, &Cancel::default()).unwrap();
        base += s.baseline / 2.0;
        mean.iter_mut().zip(&s.probs).for_each(|(m, p)| *m += p / 2.0);
    }
    assert!((r.baseline - base).abs() < 1e-5, "{} vs {base}", r.baseline);
    for (pt, want) in writer.curve.iter().zip(&mean) {
        assert!((pt.prob - want).abs() < 1e-5, "{pt:?} vs {want}");
    }
    // The range is scaled to the neuron's natural activation.
    let s = analysis::activation_stats(e).unwrap()[e.config().d_ff + 10];
    let top = 10.0 * s.min.abs().max(s.max.abs());
    assert!((values[values.len() - 1] - top).abs() < 1e-4 * top && (values[0] + top).abs() < 1e-4 * top);
}

#[test]
fn phrase_verification_is_the_teacher_forced_probability() {
    let probe = tiny(&TinySpec::default(), "probe");
    let ids = probe.engine.tok.encode_raw(" the a").unwrap();
    assert_eq!(ids.len(), 2, "the test phrase is two tokens");
    let t = verify_model(ids.clone());
    let e = &t.engine;
    let maps: Vec<_> = View::ALL.iter().map(|&v| build(e, v, false)).collect();
    let req = VerifyRequest { concept: Concept::Phrase(" the a".into()), prompts: vec![plain("in a dog")], candidates: 4, values: 3, range: 5.0 };
    let plan = analysis::VerifyPlan::new(e, &req).unwrap();
    let r = analysis::verify(e, &maps, &plan, &Cancel::default()).unwrap();
    assert!(r.phrase && r.tokens.len() == 2);
    // p(phrase | prompt, clamp) = p(t1 | prompt) · p(t2 | prompt t1), from two next-token queries.
    let prompt = e.prompt_ids(&req.prompts[0]).unwrap();
    let p_of = |clamps: &[shared::ClampSpec]| {
        let iv = e.intervention(clamps).unwrap();
        // Two whole forward passes without a cache: after the prompt, and after prompt + t1.
        let p = |seq: &[u32], t: u32| -> f32 {
            let x = Tensor::new(seq, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = e.model.forward(&x, &mut Cache::new(e.config()), std::slice::from_ref(&iv), &[]).unwrap().logits;
            flash_interp::model::softmax(&logits).unwrap().i((0, t as usize)).unwrap().to_scalar().unwrap()
        };
        let longer: Vec<u32> = prompt.iter().copied().chain([ids[0]]).collect();
        p(&prompt, ids[0]) * p(&longer, ids[1])
    };
    assert!((r.baseline / p_of(&[]) - 1.0).abs() < 1e-3, "{} vs {}", r.baseline, p_of(&[]));
    let n = &r.neurons[0];
    for pt in &n.curve {
        let want = p_of(&[shared::ClampSpec { layer: n.layer, neuron: n.neuron, value: pt.value }]);
        assert!((pt.prob / want - 1.0).abs() < 1e-3, "{pt:?} vs {want}");
    }
    assert_eq!((n.layer, n.neuron), (1, 10), "the planted phrase writer is the causal first");
}

#[test]
fn verify_refuses_bad_requests_with_clear_errors() {
    let t = tiny(&TinySpec::default(), "bad");
    let ok = VerifyRequest { concept: Concept::Tokens(vec![" the".into()]), prompts: vec![plain("hi")], candidates: 4, values: 5, range: 10.0 };
    let err = |r: VerifyRequest| analysis::VerifyPlan::new(&t.engine, &r).err().expect("refused").to_string();
    assert!(err(VerifyRequest { prompts: vec![], ..ok.clone() }).contains("prompts"));
    assert!(err(VerifyRequest { candidates: 0, ..ok.clone() }).contains("candidates"));
    assert!(err(VerifyRequest { candidates: 33, ..ok.clone() }).contains("candidates"));
    assert!(err(VerifyRequest { values: 1, ..ok.clone() }).contains("values"));
    assert!(err(VerifyRequest { range: f32::NAN, ..ok.clone() }).contains("range"));
    assert!(err(VerifyRequest { concept: Concept::Tokens(vec![" the dog".into()]), ..ok.clone() }).contains("token"));
    assert!(err(VerifyRequest { concept: Concept::Phrase("  ".into()), ..ok.clone() }).contains("empty"));
    assert!(err(VerifyRequest { concept: Concept::Phrase("a b c d e f g h i j".into()), ..ok.clone() }).contains("tokens"));
    assert!(analysis::VerifyPlan::new(&t.engine, &ok).unwrap().cost(&t.engine) > 0.0);
    // An alternative given twice counts once (else its probability would be summed twice).
    let twice = analysis::ConceptIds::resolve(&t.engine, &Concept::Tokens(vec![" the".into(), " the".into(), " a".into()])).unwrap();
    assert_eq!(twice.ids.len(), 2);
}

#[test]
fn streamed_map_equals_the_loaded_models_map() {
    // `flash-interp map` builds from the file without loading the model; the server builds from
    // the loaded model. Both must give the same map, for every view, with and without the final
    // norm, from a GGUF and from safetensors (both read tensor by tensor).
    let spec = TinySpec { q8: true, tied: false, ..Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = (dir.path().join("s.gguf"), dir.path().join("s-hf"));
    synthetic::write_gguf(&spec, &gguf).unwrap();
    synthetic::write_hf_dir(&spec, &hf).unwrap();
    for path in [&gguf, &hf] {
        let mut e = Engine::load(path, &LoadOptions::default()).unwrap();
        e.cache_dir = dir.path().join("loaded");
        for view in View::ALL {
            for final_norm in [false, true] {
                let loaded = build(&e, view, final_norm);
                let streamed_dir = dir.path().join("streamed");
                let (streamed, origin, _) =
                    flash_interp::engine::map_from_file(path, &LoadOptions::default(), &streamed_dir, view, final_norm, false, &|_, _| {}).unwrap();
                assert!(matches!(origin, MapOrigin::Built(_)), "{origin:?}");
                assert_eq!(streamed.meta, loaded.meta, "{} {view:?} {final_norm}", path.display());
                for p in [Polarity::Pos, Polarity::Neg] {
                    let (a, b) = (streamed.table(p), loaded.table(p));
                    assert_eq!(
                        (&a.ids, &a.probs, &a.lse, &a.lse_top),
                        (&b.ids, &b.probs, &b.lse, &b.lse_top),
                        "{} {view:?} {final_norm} {p:?}",
                        path.display()
                    );
                }
                // And the file it cached is the one a loaded engine then reads.
                let mut fresh = Engine::load(path, &LoadOptions::default()).unwrap();
                fresh.cache_dir = streamed_dir.clone();
                assert!(matches!(fresh.map(view, final_norm, &|_, _| {}).unwrap().1, MapOrigin::Cache));
                // Asked to rebuild, it builds again rather than reading that cache.
                let again = |rebuild| {
                    flash_interp::engine::map_from_file(path, &LoadOptions::default(), &streamed_dir, view, final_norm, rebuild, &|_, _| {})
                };
                assert!(matches!(again(false).unwrap().1, MapOrigin::Cache));
                let (rebuilt, origin, _) = again(true).unwrap();
                assert!(matches!(origin, MapOrigin::Built(_)) && rebuilt == streamed, "{origin:?}");
            }
        }
    }
}
