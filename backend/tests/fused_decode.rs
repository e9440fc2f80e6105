//! Fused decoding steps (`model::fused`, the GPU's path) against the plain path, on the CPU where
//! both run. The fused path's own pieces (stacked Q·K·V and gate·up weights used through views,
//! the cache made room for and written at each step's slot, a step's groups of rows split for
//! attention and joined after, the MLP's clamps applied to the fused activation) give the plain
//! path's logits, through cache growth, fixed-room caches, several groups of rows with their
//! own interventions, and both RoPE layouts (Hugging Face's halves, GGUF's pairs).

use candle_core::{Device, Tensor};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::model::{Cache, Clamp, Intervention, LanguageModel, Llama, Room, StepGroup};
use flash_interp::synthetic::{self, TinySpec};

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

fn steer(layer: usize, neuron: usize, value: f32) -> Intervention {
    Intervention { clamps: vec![Clamp { layer, neuron, value }] }
}

/// Both paths of one model file; the fused one stacks every block.
fn models(path: &std::path::Path) -> (Llama, Llama, flash_interp::model::Config) {
    let o = Engine::open(path, &LoadOptions::default()).unwrap();
    let plain = Llama::load_with(&*o.src, &o.cfg, false).unwrap();
    let fused = Llama::load_with(&*o.src, &o.cfg, true).unwrap();
    assert_eq!(plain.fused_blocks(), 0);
    assert_eq!(fused.fused_blocks(), o.cfg.n_layers, "{}: every block stacks its weights", path.display());
    (plain, fused, o.cfg)
}

/// Two groups of rows (one request of two rows, a steered and a plain one, and one of one row)
/// stepping together for `steps` tokens after their prompts, and a third request stepping alone
/// through `forward`: the fused model's logits are the plain model's at every step.
fn check(path: &std::path::Path, room: Room, steps: u32) {
    let (plain, fused, cfg) = models(path);
    let dev = Device::Cpu;
    let ivs_a = [Intervention::none(), steer(1, 7, 6.0)];
    let ivs_b = [steer(0, 2, -4.0)];
    let run = |m: &Llama| -> Vec<Vec<Vec<f32>>> {
        let cache = || Cache::new(&cfg).with_room(room);
        let prefill = |ids: &[u32], ivs: &[Intervention], c: &mut Cache| {
            rows(&m.forward(&Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap(), c, ivs, &[]).unwrap().logits)
        };
        let (mut a, mut b, mut c) = (cache(), cache(), cache());
        let mut out = vec![prefill(&[1, 40, 77, 263, 5, 120, 99], &ivs_a, &mut a), prefill(&[3, 8], &ivs_b, &mut b), prefill(&[9], &[], &mut c)];
        for s in 0..steps {
            let (ta, tb) = (vec![(50 + 7 * s) % 260, 51 + 3 * s], vec![60 + s]);
            let mut groups = [StepGroup { tokens: &ta, cache: &mut a, rows: &ivs_a }, StepGroup { tokens: &tb, cache: &mut b, rows: &ivs_b }];
            out.push(rows(&m.step(&mut groups).unwrap()));
            let input = Tensor::from_vec(vec![(70 + 5 * s) % 260], (1, 1), &dev).unwrap();
            out.push(rows(&m.forward(&input, &mut c, &[steer(2, 30, 5.0)], &[]).unwrap().logits));
        }
        assert_eq!((a.seq_len(), b.seq_len(), c.seq_len()), (7 + steps as usize, 2 + steps as usize, 1 + steps as usize));
        out
    };
    let (want, got) = (run(&plain), run(&fused));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let d = max_abs_diff(w, g);
        assert!(d < 1e-4, "{}: output {i}: max |diff| {d}", path.display());
    }
    // The steered row of the two-row group differs from its plain twin.
    assert!(max_abs_diff(&got[3][..1], &got[3][1..2]) > 1e-3, "the clamp changed nothing");
}

#[test]
fn fused_steps_give_the_plain_paths_logits() {
    let dir = tempfile::tempdir().unwrap();
    // Head dims 32 (grouped: 4 query heads on 2 key/value heads) and 64 (one each).
    for (name, spec) in [
        ("gqa", TinySpec { d_model: 128, d_ff: 96, n_heads: 4, n_kv_heads: 2, scale: 2.0, ..Default::default() }),
        ("mha", TinySpec { d_model: 128, d_ff: 64, n_heads: 2, n_kv_heads: 2, scale: 2.0, tied: false, ..Default::default() }),
    ] {
        let hf = dir.path().join(name);
        synthetic::write_hf_dir(&spec, &hf).unwrap();
        let gguf = dir.path().join(format!("{name}.gguf"));
        synthetic::write_gguf(&spec, &gguf).unwrap();
        // 40 steps: a growing cache doubles past 32 positions.
        check(&hf, Room::Grow, 40);
        check(&gguf, Room::Positions(60), 12);
    }
}

#[test]
fn blocks_the_kernels_do_not_take_stay_plain() {
    let dir = tempfile::tempdir().unwrap();
    // Head dim 8: not a multiple of 32.
    let path = dir.path().join("small-heads.gguf");
    synthetic::write_gguf(&TinySpec::default(), &path).unwrap();
    let o = Engine::open(&path, &LoadOptions::default()).unwrap();
    assert_eq!(Llama::load_with(&*o.src, &o.cfg, true).unwrap().fused_blocks(), 0);
    // Quantized weights multiplied from their blocks are not stacked either.
    let path = dir.path().join("q8.gguf");
    synthetic::write_gguf(&TinySpec { d_model: 128, n_heads: 4, n_kv_heads: 2, q8: true, ..Default::default() }, &path).unwrap();
    let o = Engine::open(&path, &LoadOptions::default()).unwrap();
    assert_eq!(Llama::load_with(&*o.src, &o.cfg, true).unwrap().fused_blocks(), 0);
}
