//! `flash-interp synth`: seeded random-weight models of real shapes (Llama 3.1 8B, Llama 3.2 1B,
//! Qwen2.5 7B and 0.5B, Qwen3 8B and 0.6B, Gemma 3 270M, SmolLM2 135M) as Hugging Face directories (one safetensors file, config.json,
//! tokenizer.json, tokenizer_config.json) that every command, and Hugging Face transformers,
//! load like the real model. For sizing hardware and for benchmarks at real scale without a
//! download. Tensors are generated one at a time while the file is written, so writing an 8B
//! model needs memory for its largest tensor only.

use std::borrow::Cow;
use std::path::Path;

use rayon::prelude::*;
use safetensors::{Dtype, View};
use serde_json::json;

use crate::error::{Error, Result};

/// The layout a shape's tensors and config.json follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    /// The Llama layout with biases on the Q, K and V projections.
    Qwen2,
    /// The Llama layout with a per-head RMSNorm of queries and keys.
    Qwen3,
    Gemma3,
}

/// A real model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub family: Family,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tied: bool,
    pub rope_theta: f64,
    /// Llama 3.1's RoPE scaling (factor 8, original context 8192).
    pub llama3_rope: bool,
    pub context: usize,
}

pub const SHAPES: [Shape; 8] = [
    Shape {
        name: "llama-3.1-8b",
        family: Family::Llama,
        n_layers: 32,
        d_model: 4096,
        d_ff: 14336,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        vocab: 128_256,
        tied: false,
        rope_theta: 500_000.0,
        llama3_rope: true,
        context: 131_072,
    },
    Shape {
        name: "llama-3.2-1b",
        family: Family::Llama,
        n_layers: 16,
        d_model: 2048,
        d_ff: 8192,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 64,
        vocab: 128_256,
        tied: true,
        rope_theta: 500_000.0,
        llama3_rope: true,
        context: 131_072,
    },
    Shape {
        name: "qwen2.5-7b",
        family: Family::Qwen2,
        n_layers: 28,
        d_model: 3584,
        d_ff: 18944,
        n_heads: 28,
        n_kv_heads: 4,
        head_dim: 128,
        vocab: 152_064,
        tied: false,
        rope_theta: 1_000_000.0,
        llama3_rope: false,
        context: 131_072,
    },
    Shape {
        name: "qwen2.5-0.5b",
        family: Family::Qwen2,
        n_layers: 24,
        d_model: 896,
        d_ff: 4864,
        n_heads: 14,
        n_kv_heads: 2,
        head_dim: 64,
        vocab: 151_936,
        tied: true,
        rope_theta: 1_000_000.0,
        llama3_rope: false,
        context: 32_768,
    },
    Shape {
        name: "qwen3-8b",
        family: Family::Qwen3,
        n_layers: 36,
        d_model: 4096,
        d_ff: 12288,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        vocab: 151_936,
        tied: false,
        rope_theta: 1_000_000.0,
        llama3_rope: false,
        context: 40_960,
    },
    Shape {
        name: "qwen3-0.6b",
        family: Family::Qwen3,
        n_layers: 28,
        d_model: 1024,
        d_ff: 3072,
        n_heads: 16,
        n_kv_heads: 8,
        head_dim: 128,
        vocab: 151_936,
        tied: true,
        rope_theta: 1_000_000.0,
        llama3_rope: false,
        context: 40_960,
    },
    Shape {
        name: "gemma-3-270m",
        family: Family::Gemma3,
        n_layers: 18,
        d_model: 640,
        d_ff: 2048,
        n_heads: 4,
        n_kv_heads: 1,
        head_dim: 256,
        vocab: 262_144,
        tied: true,
        rope_theta: 1_000_000.0,
        llama3_rope: false,
        context: 32_768,
    },
    Shape {
        name: "smollm2-135m",
        family: Family::Llama,
        n_layers: 30,
        d_model: 576,
        d_ff: 1536,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        vocab: 49_152,
        tied: true,
        rope_theta: 100_000.0,
        llama3_rope: false,
        context: 8192,
    },
];

/// A shape by name, or an error listing the names.
pub fn shape(name: &str) -> Result<Shape> {
    SHAPES.iter().find(|s| s.name.eq_ignore_ascii_case(name)).cloned().ok_or_else(|| {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        Error::bad(format!("no shape is known as {name:?}; known: {}", names.join(", ")))
    })
}

/// What the values of a tensor are drawn from.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Uniform in [-a, a).
    Uniform(f32),
    /// A norm weight: `base` ± 0.1.
    Norm(f32),
}

/// One tensor, generated when the writer asks for its bytes.
struct Lazy {
    dtype: Dtype,
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
}

/// Values per parallel chunk (each chunk has its own seed: the output does not depend on threads).
const CHUNK: usize = 1 << 20;

impl Lazy {
    fn values(&self, out: &mut [u8]) {
        let size = self.dtype.bitsize() / 8;
        out.par_chunks_mut(CHUNK * size).enumerate().for_each(|(c, bytes)| {
            let mut s = (self.seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
            for v in bytes.chunks_exact_mut(size) {
                // xorshift64*, to [-1, 1)
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                let x = match self.fill {
                    Fill::Uniform(a) => u * a,
                    Fill::Norm(base) => base + 0.1 * u,
                };
                match self.dtype {
                    Dtype::BF16 => v.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    Dtype::F16 => v.copy_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                    _ => v.copy_from_slice(&x.to_le_bytes()),
                }
            }
        });
    }
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut out = vec![0u8; self.data_len()];
        self.values(&mut out);
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * (self.dtype.bitsize() / 8)
    }
}

/// The tensors of `shape` with `layers` layers, in Hugging Face naming.
fn tensors(s: &Shape, layers: usize, dtype: Dtype, seed: u64) -> Vec<(String, Lazy)> {
    let (d, f, q, kv) = (s.d_model, s.d_ff, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
    let mut out: Vec<(String, Vec<usize>, Fill)> = Vec::new();
    // Gemma stores a norm as w for a scale of 1 + w, and scales its embeddings by √d on the way in.
    let gemma3 = s.family == Family::Gemma3;
    let norm = Fill::Norm(if gemma3 { 0.0 } else { 1.0 });
    // A tied head is the embedding: rows as large as an untied model's would make the last
    // token's own logit dwarf the rest (p = 1.0: a model that only repeats itself). At 6/√d the
    // top next-token probabilities of a 1-layer model are about 10–20 %, as a real model's are.
    let embed = match (gemma3, s.tied) {
        (true, _) => 1.0 / (d as f32).sqrt(),
        (false, true) => 6.0 / (d as f32).sqrt(),
        (false, false) => 1.0,
    };
    let lin = |n_in: usize| Fill::Uniform(1.7 / (n_in as f32).sqrt());
    out.push(("model.embed_tokens.weight".into(), vec![s.vocab, d], Fill::Uniform(embed)));
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d], norm));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d], lin(d)));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d], lin(d)));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d], lin(d)));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q], lin(q)));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d], norm));
        if s.family == Family::Qwen2 {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q], Fill::Uniform(0.5)));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv], Fill::Uniform(0.5)));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv], Fill::Uniform(0.5)));
        }
        if matches!(s.family, Family::Qwen3 | Family::Gemma3) {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![s.head_dim], norm));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![s.head_dim], norm));
        }
        if gemma3 {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![d], norm));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![d], norm));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d], lin(d)));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d], lin(d)));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f], lin(f)));
    }
    out.push(("model.norm.weight".into(), vec![d], norm));
    if !s.tied {
        out.push(("lm_head.weight".into(), vec![s.vocab, d], Fill::Uniform(1.0)));
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (name, shape, fill))| (name, Lazy { dtype, shape, fill, seed: seed.wrapping_mul(0x100_0000_01B3) ^ (i as u64 + 1) }))
        .collect()
}

/// Bytes the weights of `shape` with `layers` layers take in `dtype`.
pub fn weight_bytes(s: &Shape, layers: usize, dtype: Dtype) -> u64 {
    tensors(s, layers, dtype, 0).iter().map(|(_, t)| t.data_len() as u64).sum()
}

/// Write the model. `progress(bytes_done, bytes_total)` after each tensor.
pub fn write(s: &Shape, layers: usize, dtype: Dtype, seed: u64, out: &Path, progress: &dyn Fn(u64, u64)) -> Result<()> {
    if layers == 0 || layers > s.n_layers {
        return Err(Error::bad(format!("--layers must be 1 to {} for {}", s.n_layers, s.name)));
    }
    std::fs::create_dir_all(out)?;
    let ts = tensors(s, layers, dtype, seed);
    let total: u64 = ts.iter().map(|(_, t)| t.data_len() as u64).sum();
    let done = std::cell::Cell::new(0u64);
    // The writer asks for each tensor's bytes in turn; count them as they are handed out.
    struct Counted<'a> {
        t: &'a Lazy,
        done: &'a std::cell::Cell<u64>,
        total: u64,
        progress: &'a dyn Fn(u64, u64),
    }
    impl View for Counted<'_> {
        fn dtype(&self) -> Dtype {
            self.t.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.t.shape
        }
        fn data(&self) -> Cow<'_, [u8]> {
            let d = (&self.t).data().into_owned();
            self.done.set(self.done.get() + d.len() as u64);
            (self.progress)(self.done.get(), self.total);
            Cow::Owned(d)
        }
        fn data_len(&self) -> usize {
            (&self.t).data_len()
        }
    }
    let views = ts.iter().map(|(n, t)| (n.clone(), Counted { t, done: &done, total, progress }));
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = out.join("model.safetensors.part");
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| std::io::Error::other(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    let json = |name: &str, v: serde_json::Value| -> Result<()> {
        Ok(std::fs::write(out.join(name), serde_json::to_vec_pretty(&v).map_err(std::io::Error::other)?)?)
    };
    json("config.json", config(s, layers, dtype))?;
    json("tokenizer.json", tokenizer(s.vocab))?;
    let (bos, eos) = specials(s.vocab);
    json("tokenizer_config.json", json!({"bos_token": bos.1, "eos_token": eos.1, "add_bos_token": true, "model_max_length": s.context}))?;
    Ok(())
}

fn config(s: &Shape, layers: usize, dtype: Dtype) -> serde_json::Value {
    let (bos, eos) = specials(s.vocab);
    let torch_dtype = match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    let (architecture, model_type) = match s.family {
        Family::Llama => ("LlamaForCausalLM", "llama"),
        Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Family::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Family::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
    };
    let mut c = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": s.d_model,
        "intermediate_size": s.d_ff,
        "num_hidden_layers": layers,
        "num_attention_heads": s.n_heads,
        "num_key_value_heads": s.n_kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "rms_norm_eps": if s.family == Family::Llama { 1e-5 } else { 1e-6 },
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.context,
        "tie_word_embeddings": s.tied,
        "bos_token_id": bos.0,
        "eos_token_id": eos.0,
        "torch_dtype": torch_dtype,
        "hidden_act": "silu",
        "attention_bias": s.family == Family::Qwen2,
        "mlp_bias": false,
    });
    let extra = if s.family == Family::Gemma3 {
        json!({
            "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh", "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": s.head_dim, "sliding_window": 512, "sliding_window_pattern": 6,
            "final_logit_softcapping": null, "attn_logit_softcapping": null, "rope_scaling": null,
        })
    } else if matches!(s.family, Family::Qwen2 | Family::Qwen3) {
        json!({"sliding_window": s.context, "max_window_layers": layers, "use_sliding_window": false, "rope_scaling": null})
    } else if s.llama3_rope {
        json!({"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
    } else {
        json!({})
    };
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

/// BOS and EOS: the last two ids, as added special tokens.
fn specials(vocab: usize) -> ((usize, &'static str), (usize, &'static str)) {
    ((vocab - 2, "<|synth_bos|>"), (vocab - 1, "<|synth_eos|>"))
}

/// A byte-level BPE tokenizer.json of `vocab` ids: the 256 byte tokens, then filler tokens (no
/// merges, so text encodes byte by byte and every id decodes), BOS and EOS last.
fn tokenizer(vocab: usize) -> serde_json::Value {
    let bytes = crate::tokenizer::bytes_to_unicode();
    let (bos, eos) = specials(vocab);
    let mut v = serde_json::Map::new();
    for (i, c) in bytes.iter().enumerate() {
        v.insert(c.to_string(), json!(i));
    }
    for i in 256..vocab - 2 {
        v.insert(format!("<|synth_{i}|>"), json!(i));
    }
    let added: Vec<serde_json::Value> = [bos, eos]
        .iter()
        .map(|(id, s)| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    v.insert(bos.1.into(), json!(bos.0));
    v.insert(eos.1.into(), json!(eos.0));
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos.1, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos.1, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos.1: {"id": bos.1, "ids": [bos.0], "tokens": [bos.1]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": v, "merges": []}
    })
}
