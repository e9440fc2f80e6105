//! The neuron map, concept search, neuron detail and model comparison on tiny random models,
//! against a brute-force full softmax and identities that must hold.

use candle_core::{Device, IndexOp, Tensor};
use flash_interp::analysis;
use flash_interp::engine::{Engine, LoadOptions, MapOrigin};
use flash_interp::map::{self, NeuronMap};
use flash_interp::model::{Cache, Intervention};
use flash_interp::synthetic::{self, TinySpec};
use shared::{Polarity, View};

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
    let wu: Vec<Vec<f32>> = map::unembedding(&e.model, final_norm).unwrap().to_vec2().unwrap();
    let mut out = Vec::new();
    for l in 0..e.config().n_layers {
        let dirs: Vec<Vec<f32>> = map::directions(&e.model, view, l).unwrap().to_vec2().unwrap();
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
            let v: Vec<f64> = logits.iter().map(|x| p * x).collect();
            let z = lse(&v);
            let probs: Vec<f64> = v.iter().map(|x| (x - z).exp()).collect();
            let order = sorted_desc(&probs);
            let mean_top: f64 = order[..100].iter().map(|&j| probs[j]).sum::<f64>() / 100.0;
            let want: f64 = tokens.iter().map(|&t| probs[t as usize] / mean_top).sum();
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
    let t = tiny(&TinySpec::default(), "tiny");
    let m = build(&t.engine, View::Up, false);
    let (l, n) = (2, 11);
    let d = analysis::neuron_detail(&t.engine, l, n, false, 10).unwrap();
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
        (0..t.engine.config().n_layers).flat_map(|l| map::directions(&t.engine.model, View::Up, l).unwrap().to_vec2::<f32>().unwrap()).collect();
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
    assert!(analysis::neuron_detail(&t.engine, 3, 0, false, 10).is_err());
    assert!(analysis::neuron_detail(&t.engine, 0, 64, false, 10).is_err());
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
