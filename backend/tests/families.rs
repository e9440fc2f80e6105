//! The model families other than Llama, on tiny random models written by the tests: each against
//! candle-transformers' own implementation of the family, its GGUF against its Hugging Face
//! directory, the clamp identities, the KV cache, and the map against brute force computed from
//! the safetensors file directly. Llama's own tests are in `tiny_model.rs`.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::model::Arch;
use flash_interp::model::{Cache, Clamp, Intervention, Room};
use flash_interp::synthetic::{self, Plant, Qwen, TinySpec, GEMMA_WINDOW};
use shared::View;

struct Tiny {
    dir: tempfile::TempDir,
    gguf: std::path::PathBuf,
    hf: std::path::PathBuf,
}

fn gemma(spec: TinySpec) -> Tiny {
    let spec = TinySpec { gemma3: true, ..spec };
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = (dir.path().join("tiny-gemma.gguf"), dir.path().join("tiny-gemma-hf"));
    synthetic::write_gguf(&spec, &gguf).unwrap();
    synthetic::write_hf_dir(&spec, &hf).unwrap();
    Tiny { dir, gguf, hf }
}

fn load(path: &std::path::Path) -> Engine {
    Engine::load(path, &LoadOptions::default()).unwrap()
}

fn logits(e: &Engine, ids: &[u32], iv: &Intervention) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    e.model.forward(&x, &mut Cache::new(e.config()), std::slice::from_ref(iv), &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Longer than the window, so the local layers' masks matter.
const IDS: [u32; 9] = [1, 40, 77, 263, 5, 120, 99, 200, 31];

#[test]
fn gemma3_matches_candle_transformers_gemma3() {
    // candle's `gemma3` (Hugging Face names, norms as w for a scale of 1 + w; its quantized_gemma3
    // uses SiLU where Gemma has GELU, so it is no reference). Its KV cache refuses a longer
    // prompt's non-contiguous values on the CPU, so it reads the prompt one token at a time: its
    // rotating cache then holds the last `window` keys, the Hugging Face convention we follow
    // (i - j < window; its multi-token mask allows one more). Prompts run past the window.
    let t = gemma(TinySpec { n_layers: 4, scale: 2.0, ..Default::default() });
    let ours = load(&t.hf);
    assert!(matches!(ours.config().arch, Arch::Gemma3(_)));
    let cfg: candle_transformers::models::gemma3::Config = serde_json::from_slice(&std::fs::read(t.hf.join("config.json")).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[t.hf.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
    let mut reference = candle_transformers::models::gemma3::Model::new(false, &cfg, vb).unwrap();
    for n in 1..=IDS.len() {
        let x = Tensor::new(&IDS[n - 1..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let want: Vec<f32> = reference.forward(&x, n - 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = logits(&ours, &IDS[..n], &Intervention::none());
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "n={n}: max |diff| {d}");
    }
}

#[test]
fn gemma3_window_is_what_changes_long_prompts() {
    // The local layers' window must bite: with a window of 4, a token 6 places back cannot move a
    // local layer's output, so two prompts that differ only there give different logits through
    // the global layers alone; the proof here is against a model whose window covers everything.
    let t = gemma(TinySpec { n_layers: 4, scale: 2.0, ..Default::default() });
    let windowed = load(&t.hf);
    let cfg_path = t.hf.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(1000);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let full = load(&t.hf);
    let short = &IDS[..GEMMA_WINDOW];
    assert_eq!(logits(&windowed, short, &Intervention::none()), logits(&full, short, &Intervention::none()), "within the window both agree");
    assert!(max_abs_diff(&logits(&windowed, &IDS, &Intervention::none()), &logits(&full, &IDS, &Intervention::none())) > 1e-3);
}

#[test]
fn gemma3_gguf_and_safetensors_give_the_same_logits() {
    // The GGUF stores the norms as 1 + w and keeps Q/K in Hugging Face order.
    let t = gemma(TinySpec { n_layers: 4, ..Default::default() });
    let (a, b) = (load(&t.gguf), load(&t.hf));
    let without_eps = |e: &Engine| flash_interp::model::Config { rms_eps: 0.0, ..e.config().clone() };
    assert_eq!(without_eps(&a), without_eps(&b));
    assert!((a.config().rms_eps - b.config().rms_eps).abs() < 1e-9, "the GGUF stores the epsilon as f32");
    for n in [1, 4, IDS.len()] {
        let d = max_abs_diff(&logits(&a, &IDS[..n], &Intervention::none()), &logits(&b, &IDS[..n], &Intervention::none()));
        assert!(d < 1e-4, "n={n}: max |diff| {d}");
    }
}

#[test]
fn gemma3_cached_decoding_equals_the_full_forward() {
    // Token by token through the KV cache, past the window: each step's logits equal a fresh
    // forward of the whole prefix.
    let t = gemma(TinySpec { n_layers: 4, scale: 2.0, ..Default::default() });
    let e = load(&t.gguf);
    let steer = Intervention { clamps: vec![Clamp { layer: 1, neuron: 5, value: 3.0 }] };
    for iv in [Intervention::none(), steer] {
        let mut cache = Cache::new(e.config());
        for n in 1..=IDS.len() {
            let x = Tensor::new(&IDS[n - 1..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let step: Vec<f32> = e.model.forward(&x, &mut cache, std::slice::from_ref(&iv), &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap();
            let d = max_abs_diff(&step, &logits(&e, &IDS[..n], &iv));
            assert!(d < 1e-4, "position {n}: max |diff| {d}");
        }
    }
}

#[test]
fn gemma3_clamp_identities() {
    let t = gemma(TinySpec { n_layers: 3, ..Default::default() });
    let e = load(&t.gguf);
    let ids = [40u32];
    let x = Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let layers: Vec<usize> = (0..e.config().n_layers).collect();
    let out = e.model.forward(&x, &mut Cache::new(e.config()), &[], &layers).unwrap();
    let plain: Vec<f32> = out.logits.i(0).unwrap().to_vec1().unwrap();
    assert_eq!(plain, logits(&e, &ids, &Intervention::none()), "an empty intervention is the plain forward");
    for (layer, acts) in &out.mlp_acts {
        for neuron in [0, 17, e.config().d_ff - 1] {
            let natural: f32 = acts.i((0, 0, neuron)).unwrap().to_scalar().unwrap();
            let same = logits(&e, &ids, &Intervention { clamps: vec![Clamp { layer: *layer, neuron, value: natural }] });
            assert_eq!(plain, same, "layer {layer} neuron {neuron}: clamping to the natural value {natural} changed the logits");
            let moved = logits(&e, &ids, &Intervention { clamps: vec![Clamp { layer: *layer, neuron, value: natural + 5.0 }] });
            assert!(max_abs_diff(&plain, &moved) > 1e-3, "layer {layer} neuron {neuron}: the clamp had no effect");
        }
    }
}

#[test]
fn gemma3_clamping_a_planted_writer_raises_its_tokens() {
    // A neuron whose down column writes " the"'s unembedding: clamped high, p(" the") rises;
    // clamped negative, it falls.
    let plant = Plant { layer: 1, neuron: 9, tokens: vec![261], up: None, down: Some(30.0) };
    let t = gemma(TinySpec { n_layers: 3, plant: vec![plant], ..Default::default() });
    let e = load(&t.gguf);
    let p = |value: Option<f32>| {
        let clamps = value.map(|value| vec![Clamp { layer: 1, neuron: 9, value }]).unwrap_or_default();
        let l = logits(&e, &IDS[..3], &Intervention { clamps });
        let z = l.iter().map(|x| (x - l[261]).exp()).sum::<f32>();
        1.0 / z
    };
    // Gemma normalises the MLP's output before adding it (post_feedforward_layernorm), so a
    // clamp's effect saturates once the neuron dominates the layer: it moves p the right way,
    // but a larger value adds little.
    let (low, zero, high, higher) = (p(Some(-20.0)), p(Some(0.0)), p(Some(20.0)), p(Some(200.0)));
    assert!(low < zero && zero < high && high > 3.0 * low, "p(the) at -20, 0, 20: {low}, {zero}, {high}");
    assert!((higher - high).abs() < 0.01 * high, "saturated: p(the) at 20 and 200: {high}, {higher}");
}

#[test]
fn gemma3_map_matches_brute_force_from_the_file() {
    // Brute force from the safetensors file itself (not through our loader): every up row of
    // every layer times the tied embedding, with the final norm's scale 1 + w folded in.
    let plant = Plant { layer: 2, neuron: 4, tokens: vec![261, 262], up: Some(4.0), down: None };
    let t = gemma(TinySpec { n_layers: 3, plant: vec![plant], ..Default::default() });
    let mut e = load(&t.gguf);
    e.cache_dir = t.dir.path().join("cache");
    let raw: HashMap<String, Tensor> = candle_core::safetensors::load(t.hf.join("model.safetensors"), &Device::Cpu).unwrap();
    let embed: Vec<Vec<f32>> = raw["model.embed_tokens.weight"].to_vec2().unwrap();
    let g: Vec<f32> = raw["model.norm.weight"].to_vec1::<f32>().unwrap().iter().map(|w| 1.0 + w).collect();
    let (map, _) = e.map(View::Up, true, &|_, _| {}).unwrap();
    let k = 5;
    for l in 0..e.config().n_layers {
        let up: Vec<Vec<f32>> = raw[&format!("model.layers.{l}.mlp.up_proj.weight")].to_vec2().unwrap();
        for (n, row) in up.iter().enumerate() {
            let logit: Vec<f64> =
                embed.iter().map(|u| u.iter().zip(row).zip(&g).map(|((a, b), s)| *a as f64 * *b as f64 * *s as f64).sum()).collect();
            let mut order: Vec<usize> = (0..logit.len()).collect();
            order.sort_by(|&a, &b| logit[b].total_cmp(&logit[a]));
            let ids: Vec<u32> = map.top(shared::Polarity::Pos, l, n).0[..k].to_vec();
            let want: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            // Equal except where two logits tie to float precision.
            for (a, b) in ids.iter().zip(&want) {
                assert!(a == b || (logit[*a as usize] - logit[*b as usize]).abs() < 1e-4, "layer {l} neuron {n}: top {ids:?}, brute force {want:?}");
            }
        }
    }
    let planted: Vec<u32> = map.top(shared::Polarity::Pos, 2, 4).0[..2].to_vec();
    assert!(planted.contains(&261) && planted.contains(&262), "the planted neuron reads {planted:?}");
}

#[test]
fn unsupported_architectures_get_a_clear_error() {
    let t = gemma(TinySpec::default());
    let cfg_path = t.hf.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("phi3");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let err = Engine::load(&t.hf, &LoadOptions::default()).err().expect("phi3 is refused").to_string();
    assert!(err.contains("\"phi3\"") && err.contains("supported: llama") && err.contains("gemma3"), "{err}");
}

fn qwen(v: Qwen, spec: TinySpec) -> Tiny {
    let spec = TinySpec { qwen: Some(v), ..spec };
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = (dir.path().join("tiny-qwen.gguf"), dir.path().join("tiny-qwen-hf"));
    synthetic::write_gguf(&spec, &gguf).unwrap();
    synthetic::write_hf_dir(&spec, &hf).unwrap();
    Tiny { dir, gguf, hf }
}

#[test]
fn qwen2_and_qwen3_match_candle_transformers() {
    // candle's `qwen2` (Q/K/V biases) and `qwen3` (q/k norms), tied and untied heads; and the GGUF
    // of the same weights (llama.cpp's names, Q/K unpermuted) gives the same logits.
    for v in [Qwen::V2, Qwen::V3] {
        for tied in [true, false] {
            let t = qwen(v, TinySpec { tied, scale: 2.0, ..Default::default() });
            let ours = load(&t.hf);
            let want_arch = if v == Qwen::V2 { Arch::Qwen2 } else { Arch::Qwen3 };
            assert_eq!(ours.config().arch, want_arch);
            let raw = std::fs::read(t.hf.join("config.json")).unwrap();
            let vb =
                || unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[t.hf.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
            let gguf = load(&t.gguf);
            for n in [1, 4, IDS.len()] {
                let x = Tensor::new(&IDS[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let want: Vec<f32> = match v {
                    Qwen::V2 => {
                        let cfg: candle_transformers::models::qwen2::Config = serde_json::from_slice(&raw).unwrap();
                        let mut m = candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb()).unwrap();
                        m.forward(&x, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
                    }
                    Qwen::V3 => {
                        let cfg: candle_transformers::models::qwen3::Config = serde_json::from_slice(&raw).unwrap();
                        let mut m = candle_transformers::models::qwen3::ModelForCausalLM::new(&cfg, vb()).unwrap();
                        m.forward(&x, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
                    }
                };
                let got = logits(&ours, &IDS[..n], &Intervention::none());
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-4, "{v:?} tied={tied} n={n}: max |diff| {d}");
                let d = max_abs_diff(&logits(&gguf, &IDS[..n], &Intervention::none()), &got);
                assert!(d < 1e-4, "{v:?} tied={tied} n={n}: GGUF vs safetensors max |diff| {d}");
            }
        }
    }
}

#[test]
fn qwen_clamp_identities() {
    for v in [Qwen::V2, Qwen::V3] {
        let t = qwen(v, TinySpec::default());
        let e = load(&t.gguf);
        let ids = [40u32];
        let x = Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let out = e.model.forward(&x, &mut Cache::new(e.config()), &[], &[1]).unwrap();
        let plain: Vec<f32> = out.logits.i(0).unwrap().to_vec1().unwrap();
        let natural: f32 = out.mlp_acts[0].1.i((0, 0, 17)).unwrap().to_scalar().unwrap();
        assert_eq!(plain, logits(&e, &ids, &Intervention { clamps: vec![Clamp { layer: 1, neuron: 17, value: natural }] }), "{v:?}");
        let moved = logits(&e, &ids, &Intervention { clamps: vec![Clamp { layer: 1, neuron: 17, value: natural + 5.0 }] });
        assert!(max_abs_diff(&plain, &moved) > 1e-3, "{v:?}: the clamp had no effect");
    }
}

#[test]
fn gemma2_matches_candle_transformers_gemma2() {
    // candle's `gemma2` applies its window to every layer (and lets `window + 1` keys through), where
    // Gemma 2 alternates local and global layers: prompts within the window compare the rest
    // (soft-capped attention and logits, no q/k norms, alternating layers). The GGUF agrees with
    // the Hugging Face directory past the window too.
    let t = gemma(TinySpec { gemma2: true, n_layers: 4, scale: 3.0, ..Default::default() });
    let ours = load(&t.hf);
    assert!(matches!(ours.config().arch, Arch::Gemma2(ref g) if g.attn_logit_softcap == Some(50.0) && g.final_logit_softcap == Some(30.0)));
    let cfg: candle_transformers::models::gemma2::Config = serde_json::from_slice(&std::fs::read(t.hf.join("config.json")).unwrap()).unwrap();
    for n in 1..=GEMMA_WINDOW {
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[t.hf.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
        let mut reference = candle_transformers::models::gemma2::Model::new(false, &cfg, vb).unwrap();
        let x = Tensor::new(&IDS[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let want: Vec<f32> = reference.forward(&x, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = logits(&ours, &IDS[..n], &Intervention::none());
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "n={n}: max |diff| {d}");
        assert!(got.iter().all(|l| l.abs() < 30.0), "final logits are soft-capped at 30");
    }
    let gguf = load(&t.gguf);
    for n in [1, IDS.len()] {
        let d = max_abs_diff(&logits(&gguf, &IDS[..n], &Intervention::none()), &logits(&ours, &IDS[..n], &Intervention::none()));
        assert!(d < 1e-4, "n={n}: GGUF vs safetensors max |diff| {d}");
    }
}

#[test]
fn long_prompts_equal_token_by_token_decoding() {
    // A prompt of more than two query blocks runs its attention block by block, each block
    // against only the keys it can see; token by token through the cache, every position takes
    // the decoding kernel instead. Both give the same last logits: on Llama, and on Gemma 3,
    // whose local layers' window starts inside a block. (The tiny models' 256-token context is
    // raised for the test.)
    for gemma3 in [false, true] {
        let spec = TinySpec { n_layers: 4, scale: 2.0, gemma3, ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hf");
        synthetic::write_hf_dir(&spec, &hf).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
        cfg["max_position_embeddings"] = serde_json::json!(1024);
        std::fs::write(hf.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
        let e = load(&hf);
        let ids: Vec<u32> = (0..300u32).map(|i| 5 + i * 37 % 250).collect();
        assert!(ids.len() > 2 * flash_interp::model::common::QUERY_BLOCK);
        let whole = logits(&e, &ids, &Intervention::none());
        let mut cache = Cache::new(e.config());
        let mut step = Vec::new();
        for id in &ids {
            let x = Tensor::new(&[*id], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            step = e.model.forward(&x, &mut cache, &[Intervention::none()], &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap();
        }
        let d = max_abs_diff(&whole, &step);
        eprintln!("DIFF gemma3 {gemma3}: {d} max|logit| {}", whole.iter().fold(0f32, |m, x| m.max(x.abs())));
        // Two summation orders over 300 positions and 4 layers: within 1e-5 of the logits' scale
        // (up to ~18 here; a wrong mask or window moves them by far more).
        let tol = 1e-5 * whole.iter().fold(1f32, |m, x| m.max(x.abs()));
        assert!(d < tol, "gemma3 {gemma3}: max |diff| {d}, tolerance {tol}");
        // In chunks: Gemma's local layers keep only their window, so a chunk after the first
        // attends to a cache that dropped positions (its mask's first columns); a chunk longer
        // than their buffer (the window plus WINDOW_SLACK) keeps only its end.
        let mut cache = Cache::new(e.config());
        let mut at = 0;
        let mut chunked = Vec::new();
        for n in [150, 5, 1, 144] {
            let x = Tensor::new(&ids[at..at + n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            chunked = e.model.forward(&x, &mut cache, &[Intervention::none()], &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap();
            at += n;
        }
        assert_eq!(at, ids.len());
        let d = max_abs_diff(&whole, &chunked);
        assert!(d < 1e-4, "gemma3 {gemma3}, in chunks: max |diff| {d}");
    }
}

#[test]
fn caches_make_room_as_asked() {
    // A scratch cache gives the kept cache's logits, keeps no keys and refuses to go on; a cache
    // told its length takes it at once and then decodes into it as a growing one does.
    let t = gemma(TinySpec { n_layers: 4, scale: 2.0, ..Default::default() });
    let e = load(&t.hf);
    let x = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let one = |x: &Tensor, cache: &mut Cache| -> Vec<f32> {
        e.model.forward(x, cache, &[Intervention::none()], &[]).unwrap().logits.i(0).unwrap().to_vec1().unwrap()
    };
    let mut grow = Cache::new(e.config());
    let kept = one(&x, &mut grow);
    let mut scratch = Cache::new(e.config()).with_room(Room::Scratch);
    let d = max_abs_diff(&one(&x, &mut scratch), &kept);
    assert!(d < 1e-5, "{d}");
    assert!(scratch.kv_positions().iter().all(|&p| p == 0), "{:?}", scratch.kv_positions());
    let next = Tensor::new(&[7u32], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    assert!(e.model.forward(&next, &mut scratch, &[Intervention::none()], &[]).is_err());
    let mut sized = Cache::new(e.config()).with_room(Room::Positions(IDS.len() + 3));
    let d = max_abs_diff(&one(&x, &mut sized), &kept);
    assert!(d < 1e-5, "{d}");
    assert!(sized.kv_positions().iter().all(|&p| p == IDS.len() + 3), "{:?}", sized.kv_positions());
    assert!(grow.kv_positions().iter().all(|&p| p == 32), "{:?}", grow.kv_positions());
    for _ in 0..3 {
        let d = max_abs_diff(&one(&next, &mut sized), &one(&next, &mut grow));
        assert!(d < 1e-5, "{d}");
    }
    assert!(sized.kv_positions().iter().all(|&p| p == IDS.len() + 3), "no new allocation: {:?}", sized.kv_positions());
    // Normal and steered rows split at the clamp's layer: the layers below it, run once and then
    // repeated, keep the room asked for too.
    let rows = [Intervention::none(), Intervention { clamps: vec![Clamp { layer: 2, neuron: 5, value: 3.0 }] }];
    let mut two = Cache::new(e.config()).with_room(Room::Positions(IDS.len() + 3));
    e.model.forward(&x, &mut two, &rows, &[]).unwrap();
    assert!(two.kv_positions().iter().all(|&p| p == IDS.len() + 3), "{:?}", two.kv_positions());
}
