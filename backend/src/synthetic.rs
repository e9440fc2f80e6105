//! Tiny random-weight models for tests, of the Llama or the Gemma 3 family, written both as GGUF
//! (the llama.cpp layout: Llama's Q/K rows permuted for the interleaved RoPE, Gemma's norms stored
//! as `1 + w`) and as a Hugging Face directory (safetensors, config.json, tokenizer.json,
//! tokenizer_config.json). Same weights, two files: the loaders must agree.
//! Nothing here downloads anything.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};

/// ChatML, as SmolLM2 uses it.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 6] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "g")];

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub tied: bool,
    pub seed: u64,
    /// Multiplies the random weights: larger gives peakier distributions.
    pub scale: f32,
    /// Store the 2-D weights as Q8_0 in the GGUF (the safetensors stay f32).
    pub q8: bool,
    /// Neurons (layer, index) whose up row and down column are negated: the model is unchanged.
    pub negate: Vec<(usize, usize)>,
    /// Neurons whose up row is replaced by fresh random values (a "fine-tuned" copy).
    pub perturb: Vec<(usize, usize)>,
    /// Neurons given chosen directions, so that what they read and write is known by construction.
    pub plant: Vec<Plant>,
    /// A Gemma 3 model instead of a Llama one: sandwich and q/k norms, GeGLU, √d embeddings, and
    /// local layers with a [`GEMMA_WINDOW`]-token window between global ones (every
    /// [`GEMMA_PATTERN`]-th layer).
    pub gemma3: bool,
    /// With `gemma3`: Gemma 2 instead (no q/k norms; attention and final logits soft-capped at 50
    /// and 30; local and global layers alternate on one RoPE base).
    pub gemma2: bool,
    /// A Qwen model of the Llama layout instead: Qwen2's Q/K/V biases or Qwen3's q/k norms.
    pub qwen: Option<Qwen>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Qwen {
    V2,
    V3,
}

/// The tiny Gemma 3's sliding window (keys a local layer sees) and layer pattern: short, so that
/// the tests' prompts leave the window.
pub const GEMMA_WINDOW: usize = 4;
pub const GEMMA_PATTERN: usize = 2;

/// A planted neuron: its up row and/or its down column set to `scale` × the sum of the
/// unembedding rows of `tokens` (the LM head's, or the tied embedding's). An up row makes the map
/// find it for them; a down column makes clamping it high raise their logits; a zero scale
/// silences that side.
#[derive(Debug, Clone, PartialEq)]
pub struct Plant {
    pub layer: usize,
    pub neuron: usize,
    pub tokens: Vec<u32>,
    pub up: Option<f32>,
    pub down: Option<f32>,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            n_layers: 3,
            d_model: 32,
            d_ff: 64,
            n_heads: 4,
            n_kv_heads: 2,
            tied: true,
            seed: 7,
            scale: 1.0,
            q8: false,
            negate: vec![],
            perturb: vec![],
            plant: vec![],
            gemma3: false,
            gemma2: false,
            qwen: None,
        }
    }
}

impl TinySpec {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// The tiny vocabulary: special tokens, the 256 byte tokens, then the merged tokens.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend(crate::tokenizer::bytes_to_unicode().iter().map(|c| c.to_string()));
    v.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    v
}

struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        // xorshift64*, mapped to [-1, 1)
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545F4914F6CDD1D);
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn tensor(&mut self, shape: (usize, usize), scale: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| self.next_f32() * scale).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    /// A norm weight near 1; near 0 when `offset` (Gemma stores `w` for a scale of `1 + w`).
    fn vector(&mut self, n: usize, scale: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..n).map(|_| self.next_f32() * scale).collect();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    }
    fn norm(&mut self, n: usize, offset: bool) -> Result<Tensor> {
        let base = if offset { 0.0 } else { 1.0 };
        let v: Vec<f32> = (0..n).map(|_| base + 0.2 * self.next_f32()).collect();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    }
}

/// Random weights in Hugging Face naming and layout.
pub fn weights(spec: &TinySpec) -> Result<Vec<(String, Tensor)>> {
    let mut rng = Rng(spec.seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let (d, f, hd) = (spec.d_model, spec.d_ff, spec.head_dim());
    let vocab = vocab().len();
    let s = spec.scale;
    let g = spec.gemma3;
    // Gemma scales the embedding by √d on the way in: keep the residual stream's size as Llama's.
    let embed_scale = if g { s / (d as f32).sqrt() } else { s };
    let mut w = vec![("model.embed_tokens.weight".to_string(), rng.tensor((vocab, d), embed_scale)?)];
    for l in 0..spec.n_layers {
        let p = format!("model.layers.{l}");
        let wd = s / (d as f32).sqrt() * 1.7;
        w.push((format!("{p}.input_layernorm.weight"), rng.norm(d, g)?));
        w.push((format!("{p}.self_attn.q_proj.weight"), rng.tensor((spec.n_heads * hd, d), wd)?));
        w.push((format!("{p}.self_attn.k_proj.weight"), rng.tensor((spec.n_kv_heads * hd, d), wd)?));
        w.push((format!("{p}.self_attn.v_proj.weight"), rng.tensor((spec.n_kv_heads * hd, d), wd)?));
        w.push((format!("{p}.self_attn.o_proj.weight"), rng.tensor((d, spec.n_heads * hd), wd)?));
        match spec.qwen {
            Some(Qwen::V2) => {
                w.push((format!("{p}.self_attn.q_proj.bias"), rng.vector(spec.n_heads * hd, 0.5)?));
                w.push((format!("{p}.self_attn.k_proj.bias"), rng.vector(spec.n_kv_heads * hd, 0.5)?));
                w.push((format!("{p}.self_attn.v_proj.bias"), rng.vector(spec.n_kv_heads * hd, 0.5)?));
            }
            Some(Qwen::V3) => {
                w.push((format!("{p}.self_attn.q_norm.weight"), rng.norm(hd, false)?));
                w.push((format!("{p}.self_attn.k_norm.weight"), rng.norm(hd, false)?));
            }
            None => {}
        }
        w.push((format!("{p}.post_attention_layernorm.weight"), rng.norm(d, g)?));
        if g && !spec.gemma2 {
            w.push((format!("{p}.self_attn.q_norm.weight"), rng.norm(hd, g)?));
            w.push((format!("{p}.self_attn.k_norm.weight"), rng.norm(hd, g)?));
        }
        if g {
            w.push((format!("{p}.pre_feedforward_layernorm.weight"), rng.norm(d, g)?));
            w.push((format!("{p}.post_feedforward_layernorm.weight"), rng.norm(d, g)?));
        }
        w.push((format!("{p}.mlp.gate_proj.weight"), rng.tensor((f, d), wd)?));
        w.push((format!("{p}.mlp.up_proj.weight"), rng.tensor((f, d), wd)?));
        w.push((format!("{p}.mlp.down_proj.weight"), rng.tensor((d, f), s / (f as f32).sqrt() * 1.7)?));
    }
    w.push(("model.norm.weight".to_string(), rng.norm(d, g)?));
    if !spec.tied {
        w.push(("lm_head.weight".to_string(), rng.tensor((vocab, d), s)?));
    }
    let mut fresh = Rng(spec.seed.wrapping_mul(0xD1B54A32D192ED03) | 1);
    for (name, t) in w.iter_mut() {
        let Some(rest) = name.strip_prefix("model.layers.") else { continue };
        let (l, tail) = rest.split_once('.').unwrap();
        let l: usize = l.parse().unwrap();
        let is_up = tail == "mlp.up_proj.weight";
        let is_down = tail == "mlp.down_proj.weight";
        if !is_up && !is_down {
            continue;
        }
        let mut rows: Vec<Vec<f32>> = if is_up { t.to_vec2()? } else { t.t()?.to_vec2()? };
        for &(_, n) in spec.negate.iter().filter(|(ln, _)| *ln == l) {
            rows[n].iter_mut().for_each(|x| *x = -*x);
        }
        if is_up {
            for &(_, n) in spec.perturb.iter().filter(|(ln, _)| *ln == l) {
                rows[n].iter_mut().for_each(|x| *x = fresh.next_f32() * s / (d as f32).sqrt() * 1.7);
            }
        }
        let flat = Tensor::new(rows, &Device::Cpu)?;
        *t = if is_up { flat } else { flat.t()?.contiguous()? };
    }
    for p in &spec.plant {
        let head = w.iter().find(|(n, _)| n == "lm_head.weight").or_else(|| w.iter().find(|(n, _)| n == "model.embed_tokens.weight"));
        let Some((_, head)) = head else { continue };
        let mut u = vec![0f32; d];
        for &tok in &p.tokens {
            let row: Vec<f32> = head.get(tok as usize)?.to_vec1()?;
            u.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        for (side, scale) in [("up_proj", p.up), ("down_proj", p.down)] {
            let Some(scale) = scale else { continue };
            let name = format!("model.layers.{}.mlp.{side}.weight", p.layer);
            let Some((_, t)) = w.iter_mut().find(|(n, _)| *n == name) else { continue };
            let is_up = side == "up_proj";
            let mut rows: Vec<Vec<f32>> = if is_up { t.to_vec2()? } else { t.t()?.to_vec2()? };
            rows[p.neuron] = u.iter().map(|x| x * scale).collect();
            let flat = Tensor::new(rows, &Device::Cpu)?;
            *t = if is_up { flat } else { flat.t()?.contiguous()? };
        }
    }
    Ok(w)
}

/// llama.cpp's permutation of HF Q/K rows into the interleaved-RoPE layout.
pub fn permute_for_gguf(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_heads;
    Ok(w.reshape((n_heads, 2, hd / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

fn gguf_name(hf: &str, gemma: bool) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (l, tail) = rest.split_once('.').unwrap();
        let t = match tail {
            "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
            "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
            "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
            "self_attn.q_norm.weight" => "attn_q_norm.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "self_attn.k_norm.weight" => "attn_k_norm.weight",
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            other => panic!("unknown tensor {other}"),
        };
        return format!("blk.{l}.{t}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight",
        "model.norm.weight" => "output_norm.weight",
        "lm_head.weight" => "output.weight",
        other => panic!("unknown tensor {other}"),
    }
    .to_string()
}

/// Write the tiny model as a GGUF file.
pub fn write_gguf(spec: &TinySpec, path: &Path) -> Result<()> {
    let vocab = vocab();
    let strs = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let types: Vec<Value> = (0..vocab.len()).map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 })).collect();
    let u = |x: usize| Value::U32(x as u32);
    let arch = match (spec.gemma3, spec.qwen) {
        (true, _) if spec.gemma2 => "gemma2",
        (true, _) => "gemma3",
        (_, Some(Qwen::V2)) => "qwen2",
        (_, Some(Qwen::V3)) => "qwen3",
        _ => "llama",
    };
    let key = |k: &str| format!("{arch}.{k}");
    let mut family: Vec<(String, Value)> = vec![
        (key("block_count"), u(spec.n_layers)),
        (key("context_length"), u(256)),
        (key("embedding_length"), u(spec.d_model)),
        (key("feed_forward_length"), u(spec.d_ff)),
        (key("attention.head_count"), u(spec.n_heads)),
        (key("attention.head_count_kv"), u(spec.n_kv_heads)),
        (key("rope.freq_base"), Value::F32(if spec.gemma3 && !spec.gemma2 { 1_000_000.0 } else { 10000.0 })),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (key("vocab_size"), u(vocab.len())),
    ];
    if spec.gemma3 {
        family.extend([
            (key("attention.key_length"), u(spec.head_dim())),
            (key("attention.value_length"), u(spec.head_dim())),
            (key("attention.sliding_window"), u(GEMMA_WINDOW)),
        ]);
        if spec.gemma2 {
            family.extend([(key("attn_logit_softcapping"), Value::F32(50.0)), (key("final_logit_softcapping"), Value::F32(30.0))]);
        } else {
            family.push((key("attention.sliding_window_type"), u(GEMMA_PATTERN)));
        }
    } else {
        family.push((key("rope.dimension_count"), u(spec.head_dim())));
    }
    let mut meta: Vec<(&str, Value)> =
        vec![("general.architecture", Value::String(arch.into())), ("general.name", Value::String(format!("tiny-random-{arch}")))];
    meta.extend(family.iter().map(|(k, v)| (k.as_str(), v.clone())));
    meta.extend([
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strs(vocab.clone())),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strs(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect())),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String(CHAT_TEMPLATE.into())),
    ]);
    let mut tensors = Vec::new();
    for (name, t) in weights(spec)? {
        let t = if spec.gemma3 {
            // llama.cpp stores Gemma's norms as the scale 1 + w, and leaves Q/K in HF order.
            if t.rank() == 1 {
                (t + 1.0)?
            } else {
                t
            }
        } else if spec.qwen.is_some() {
            t // llama.cpp leaves Qwen's Q/K in Hugging Face order (NEOX RoPE).
        } else if name.ends_with("q_proj.weight") {
            permute_for_gguf(&t, spec.n_heads)?
        } else if name.ends_with("k_proj.weight") {
            permute_for_gguf(&t, spec.n_kv_heads)?
        } else {
            t
        };
        let dtype = if spec.q8 && t.rank() == 2 { GgmlDType::Q8_0 } else { GgmlDType::F32 };
        tensors.push((gguf_name(&name, spec.gemma3), QTensor::quantize(&t, dtype)?));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// The tokenizer.json a Hugging Face export of the tiny model would carry, written out as JSON
/// (not through our GGUF tokenizer builder), so the two tokenizer paths can be compared.
pub fn tokenizer_json() -> serde_json::Value {
    let vocab = vocab();
    let vmap: serde_json::Map<String, serde_json::Value> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vmap, "merges": MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
}

/// Write the tiny model as a Hugging Face directory.
pub fn write_hf_dir(spec: &TinySpec, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let w: HashMap<String, Tensor> = weights(spec)?.into_iter().collect();
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.d_model,
        "intermediate_size": spec.d_ff,
        "vocab_size": vocab().len(),
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": spec.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    if let Some(q) = spec.qwen {
        let qwen = json!({
            "architectures": [if q == Qwen::V2 { "Qwen2ForCausalLM" } else { "Qwen3ForCausalLM" }],
            "model_type": if q == Qwen::V2 { "qwen2" } else { "qwen3" },
            "head_dim": spec.head_dim(),
            "hidden_act": "silu",
            "attention_bias": q == Qwen::V2,
            "sliding_window": 4096,
            "max_window_layers": spec.n_layers,
            "use_sliding_window": false,
        });
        cfg.as_object_mut().unwrap().extend(qwen.as_object().unwrap().clone());
    }
    if spec.gemma3 {
        let gemma = json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "head_dim": spec.head_dim(),
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": spec.head_dim(),
            "sliding_window": GEMMA_WINDOW,
            "sliding_window_pattern": GEMMA_PATTERN,
            "final_logit_softcapping": null,
            "attn_logit_softcapping": null,
            "attention_bias": false,
            "rope_scaling": null,
        });
        cfg.as_object_mut().unwrap().extend(gemma.as_object().unwrap().clone());
        if spec.gemma2 {
            let g2 = json!({
                "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "rope_theta": 10000.0,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            });
            let o = cfg.as_object_mut().unwrap();
            o.extend(g2.as_object().unwrap().clone());
            o.remove("rope_local_base_freq");
            o.remove("sliding_window_pattern");
        }
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).map_err(std::io::Error::other)?)?;
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tokenizer_json()).map_err(std::io::Error::other)?)?;
    let tc = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": CHAT_TEMPLATE});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec_pretty(&tc).map_err(std::io::Error::other)?)?;
    Ok(())
}

/// Overwrite the first value of the f32 tensor `name` in a GGUF file with `value` (tests use it
/// to make a corrupt model, e.g. with a NaN norm weight).
pub fn overwrite_f32(path: &Path, name: &str, value: f32) -> Result<()> {
    let mut f = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| Error::model(path, e))?;
    let info = content.tensor_infos.get(name).ok_or_else(|| Error::model(path, format!("no tensor {name}")))?;
    if info.ggml_dtype != GgmlDType::F32 {
        return Err(Error::model(path, format!("{name} is not stored as f32")));
    }
    let at = (content.tensor_data_offset + info.offset) as usize;
    let mut bytes = std::fs::read(path)?;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    Ok(std::fs::write(path, bytes)?)
}
