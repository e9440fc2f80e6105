//! Shape and hyper-parameters of a model, from GGUF metadata or config.json: the Llama shape
//! every supported family shares, and what a family adds ([`Arch`]).

/// Llama 3 style RoPE frequency scaling (config.json `rope_scaling` with `rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The model family: which forward pass (one file each under `model/`) runs the weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Arch {
    /// Llama 2/3/3.1/3.2 and the models of the same layout (SmolLM2, Mistral within its window).
    #[default]
    Llama,
    /// Qwen2/2.5: the Llama layout with biases on the Q, K and V projections.
    Qwen2,
    /// Qwen3: the Llama layout with a per-head RMSNorm of queries and keys before RoPE.
    Qwen3,
    /// Gemma 3: GeGLU (tanh GELU), RMSNorm around both sublayers, q/k norms, embeddings scaled by
    /// √d, local sliding-window layers with their own RoPE base, a global layer every `pattern`.
    Gemma3(Gemma3Params),
    /// Gemma 2: Gemma 3's layout without the q/k norms, with attention-logit and final-logit
    /// soft-capping, local and global layers alternating, one RoPE base.
    Gemma2(Gemma3Params),
}

/// What Gemma 2 and 3 add to the Llama shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Params {
    /// Keys a local layer's query sees: positions `i - window < j <= i` (Hugging Face and
    /// llama.cpp's convention).
    pub sliding_window: usize,
    /// Every `pattern`-th layer (1-based) is global; the others are local.
    pub pattern: usize,
    /// RoPE base of the local layers (the global layers use `Config::rope_theta`).
    pub rope_local_theta: f32,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f32,
    /// `logits = cap * tanh(logits / cap)` when set (Gemma 2; none in Gemma 3).
    pub final_logit_softcap: Option<f32>,
    /// The same on the attention scores, before the mask (Gemma 2).
    pub attn_logit_softcap: Option<f32>,
    /// Linear RoPE scaling of the global layers (Gemma 3 4B and larger: 8); 1 for none.
    pub global_rope_factor: f32,
}

impl Gemma3Params {
    pub fn is_global(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.pattern)
    }
}

impl Arch {
    /// The families this build runs, for error messages.
    pub const SUPPORTED: &'static str = "llama (Llama 2/3/3.1/3.2, SmolLM, Mistral and other models of the Llama layout), qwen2 (Qwen2/2.5), \
         qwen3 (Qwen3, dense), gemma2 (Gemma 2) and gemma3 (Gemma 3), from GGUF or a Hugging Face directory";

    /// Gemma 2's or 3's parameters, for either.
    pub fn gemma(&self) -> Option<&Gemma3Params> {
        match self {
            Arch::Gemma3(g) | Arch::Gemma2(g) => Some(g),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3(_) => "gemma3",
            Arch::Gemma2(_) => "gemma2",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    pub d_model: usize,
    /// Neurons per MLP layer (intermediate size).
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// Per-frequency divisors stored in a GGUF `rope_freqs.weight` tensor (Llama 3 GGUFs).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Q/K weights laid out for the interleaved (adjacent pairs) RoPE, as GGUF llama files are.
    /// Hugging Face checkpoints use the split-halves layout (`rotate_half`).
    pub rope_interleaved: bool,
    pub max_seq_len: usize,
    /// LM head tied to the token embedding (no separate output weight).
    pub tied_embeddings: bool,
}

impl Config {
    /// Shapes that can be run: a corrupt or inconsistent file is refused here, before any table
    /// is sized from it. (Each weight's shape is then checked against these numbers.)
    pub fn check(&self) -> std::result::Result<(), String> {
        let positive = [
            ("layers", self.n_layers),
            ("model width", self.d_model),
            ("MLP width", self.d_ff),
            ("attention heads", self.n_heads),
            ("key/value heads", self.n_kv_heads),
            ("head size", self.head_dim),
            ("vocabulary", self.vocab_size),
            ("context", self.max_seq_len),
        ];
        if let Some((what, _)) = positive.iter().find(|(_, n)| *n == 0) {
            return Err(format!("the model's {what} is 0"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!("{} attention heads cannot share {} key/value heads", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head size {} is odd (RoPE rotates pairs)", self.head_dim));
        }
        if let Some(g) = self.arch.gemma() {
            if g.sliding_window == 0 || g.pattern == 0 {
                return Err("the sliding window and its layer pattern must be positive".into());
            }
            if !(g.rope_local_theta.is_finite() && g.rope_local_theta > 0.0 && g.query_pre_attn_scalar.is_finite() && g.query_pre_attn_scalar > 0.0) {
                return Err("the local RoPE base and the attention scale must be positive numbers".into());
            }
            if !(g.global_rope_factor.is_finite() && g.global_rope_factor > 0.0) {
                return Err("the RoPE scaling factor must be a positive number".into());
            }
            if [g.final_logit_softcap, g.attn_logit_softcap].iter().flatten().any(|c| !(c.is_finite() && *c > 0.0)) {
                return Err("the logit soft-cap must be a positive number".into());
            }
        }
        if self.rope_freq_factors.as_ref().is_some_and(|f| f.len() != self.head_dim / 2) {
            return Err(format!("rope_freqs has the wrong length for head size {}", self.head_dim));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err("the norm epsilon and RoPE base must be positive numbers".into());
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, one per pair of dimensions, with any scaling applied.
    pub fn inv_freqs(&self) -> Vec<f32> {
        self.inv_freqs_with_base(self.rope_theta)
    }

    /// [`Config::inv_freqs`] for another RoPE base (Gemma 3's local layers).
    pub fn inv_freqs_with_base(&self, theta: f32) -> Vec<f32> {
        let half = self.head_dim / 2;
        let mut f: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f32 / self.head_dim as f32)).collect();
        if let Some(s) = &self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings as f32 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f32 / s.high_freq_factor;
            for freq in f.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *freq;
                *freq = if wavelen < high_wavelen {
                    *freq
                } else if wavelen > low_wavelen {
                    *freq / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f32 / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *freq / s.factor + smooth * *freq
                };
            }
        }
        if let Some(div) = &self.rope_freq_factors {
            for (freq, d) in f.iter_mut().zip(div) {
                *freq /= d;
            }
        }
        f
    }
}

/// The fields of a Hugging Face `config.json` that the Llama family shares, with the same names,
/// defaults and strictness as candle-transformers' `LlamaConfig` (which the tests load the same
/// directories with): a missing `rope_theta` is 10,000, a missing `num_key_value_heads` is the
/// number of heads, an unknown `rope_scaling.rope_type` is an error. Kept here so that the
/// program does not compile all of candle-transformers for one struct.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HfConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f32,
    pub eos_token_id: Option<EosTokens>,
    pub rope_scaling: Option<HfRopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: Option<bool>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}

impl HfConfig {
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Llama 3's frequency scaling, if the config asks for it.
    pub fn llama3_rope_scaling(&self) -> Option<RopeScaling> {
        self.rope_scaling.as_ref().filter(|s| s.rope_type == HfRopeType::Llama3).map(|s| RopeScaling {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position_embeddings: s.original_max_position_embeddings,
        })
    }

    /// The end-of-sequence ids, one or several.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(EosTokens::Single(e)) => vec![*e],
            Some(EosTokens::Multiple(v)) => v.clone(),
            None => vec![],
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct HfRopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
    pub rope_type: HfRopeType,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub enum HfRopeType {
    #[serde(rename = "llama3")]
    Llama3,
    #[serde(rename = "default")]
    Default,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum EosTokens {
    Single(u32),
    Multiple(Vec<u32>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::llama::{Llama3RopeType, LlamaConfig, LlamaEosToks};

    /// Every config both read the same, and every config one refuses the other refuses.
    #[test]
    fn hf_config_reads_config_json_as_candle_transformers_does() {
        let base = serde_json::json!({
            "hidden_size": 64, "intermediate_size": 96, "vocab_size": 300, "num_hidden_layers": 2,
            "num_attention_heads": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
        });
        let with = |extra: serde_json::Value| {
            let mut v = base.clone();
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v
        };
        let scaling = |t: &str| {
            serde_json::json!({"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": t}})
        };
        let cases = [
            base.clone(),
            with(serde_json::json!({"num_key_value_heads": 2, "rope_theta": 500000.0, "tie_word_embeddings": true, "eos_token_id": 7})),
            with(serde_json::json!({"eos_token_id": [7, 9], "tie_word_embeddings": false, "rope_scaling": null})),
            with(scaling("llama3")),
            with(scaling("default")),
            with(scaling("yarn")),
            with(serde_json::json!({"rope_scaling": {"factor": 2.0, "type": "linear"}})),
            with(serde_json::json!({"eos_token_id": "</s>"})),
            serde_json::json!({"hidden_size": 64}),
        ];
        for case in cases {
            let (ours, theirs) = (serde_json::from_value::<HfConfig>(case.clone()), serde_json::from_value::<LlamaConfig>(case.clone()));
            assert_eq!(ours.is_ok(), theirs.is_ok(), "{case}: {ours:?} vs {theirs:?}");
            let (Ok(o), Ok(t)) = (ours, theirs) else { continue };
            let t_eos = match &t.eos_token_id {
                Some(LlamaEosToks::Single(e)) => vec![*e],
                Some(LlamaEosToks::Multiple(v)) => v.clone(),
                None => vec![],
            };
            let t_scaling = t
                .rope_scaling
                .as_ref()
                .filter(|s| matches!(s.rope_type, Llama3RopeType::Llama3))
                .map(|s| (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings));
            let o_scaling = o.llama3_rope_scaling().map(|s| (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings));
            assert_eq!(
                (o.hidden_size, o.intermediate_size, o.vocab_size, o.num_hidden_layers, o.num_attention_heads, o.num_key_value_heads()),
                (t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads()),
                "{case}"
            );
            assert_eq!(
                (o.rms_norm_eps, o.rope_theta, o.max_position_embeddings, o.tie_word_embeddings),
                (t.rms_norm_eps, t.rope_theta, t.max_position_embeddings, t.tie_word_embeddings),
                "{case}"
            );
            assert_eq!((o.eos_ids(), o_scaling), (t_eos, t_scaling), "{case}");
        }
    }
}
