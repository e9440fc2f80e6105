//! `flash-interp synth`: random-weight models of real shapes load like the real thing, with the
//! shape's settings, and are the same file for the same seed.

use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::fetch::sha256_file;
use flash_interp::model::Arch;
use flash_interp::synth::{self, Family};
use safetensors::Dtype;
use shared::PromptSpec;

#[test]
fn synthetic_shapes_load_with_their_settings_and_answer() {
    let dir = tempfile::tempdir().unwrap();
    for (name, layers) in [("smollm2-135m", 2), ("gemma-3-270m", 1), ("qwen2.5-0.5b", 1), ("qwen3-0.6b", 1)] {
        let shape = synth::shape(name).unwrap();
        let out = dir.path().join(name);
        synth::write(&shape, layers, Dtype::BF16, 1, &out, &|_, _| {}).unwrap();
        let bytes = std::fs::metadata(out.join("model.safetensors")).unwrap().len();
        assert!(bytes >= synth::weight_bytes(&shape, layers, Dtype::BF16), "{name}: {bytes} bytes");
        let e = Engine::load(&out, &LoadOptions::default()).unwrap();
        let c = e.config();
        assert_eq!(
            (c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
            (layers, shape.d_model, shape.d_ff, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.vocab),
            "{name}"
        );
        let arch = match shape.family {
            Family::Llama => matches!(c.arch, Arch::Llama),
            Family::Qwen2 => matches!(c.arch, Arch::Qwen2),
            Family::Qwen3 => matches!(c.arch, Arch::Qwen3),
            Family::Gemma3 => matches!(c.arch, Arch::Gemma3(_)),
        };
        assert!(arch, "{name}: {:?}", c.arch);
        assert_eq!(c.tied_embeddings, shape.tied);
        let ids = e.prompt_ids(&PromptSpec { text: "hello".into(), chat: Some(false), messages: None }).unwrap();
        assert_eq!(ids.len(), 6, "BOS and five bytes: {ids:?}");
        let top = e.next_token(&ids, &Default::default(), 3, &flash_interp::Cancel::default()).unwrap();
        assert!(top.iter().all(|t| t.prob.is_finite() && t.prob > 1e-6), "{name}: {top:?}");
        // Not a model that only repeats its last token ("o", p = 1.0), which would make every
        // greedy comparison on it trivial.
        assert!(top[0].prob < 0.9, "{name}: {top:?}");
    }
    assert!(synth::shape("llama-9t").unwrap_err().to_string().contains("llama-3.1-8b"));
    assert!(synth::write(&synth::shape("smollm2-135m").unwrap(), 31, Dtype::BF16, 0, dir.path(), &|_, _| {}).is_err());
}

#[test]
fn the_same_seed_writes_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let shape = synth::shape("smollm2-135m").unwrap();
    let write = |seed: u64, at: &str| {
        synth::write(&shape, 1, Dtype::F16, seed, &dir.path().join(at), &|_, _| {}).unwrap();
        sha256_file(&dir.path().join(at).join("model.safetensors")).unwrap()
    };
    let (a, b, c) = (write(3, "a"), write(3, "b"), write(4, "c"));
    assert_eq!(a, b);
    assert_ne!(a, c);
}
