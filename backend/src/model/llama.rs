//! Our own Llama forward pass. candle-transformers' Llama hides the MLP, and we need to reach inside
//! it: read and clamp the gated activation act(gate(x)) * up(x), the input of down_proj.
//!
//! The Llama layout's two Qwen variants run here too, each checked against candle-transformers'
//! own implementation: Qwen2's Q/K/V biases and Qwen3's per-head q/k RMSNorm are the only
//! differences, loaded when the family has them.
//!
//! The model is immutable and shared in an `Arc`; the KV cache is passed in per request and the
//! intervention is plain data, so one loaded model serves many requests at once.
//! Order as in candle's model files: attention, MLP, blocks, the public model.

use super::common::{
    attend_segments, causal_mask, check_forward, check_step, linear, rope_tables, run_layers, run_step_layers, tensor_bytes, Act, Cache,
    ForwardOutput, Intervention, Linear, Mlp, MlpSite, Pos, RmsNorm, Segment, Shell, StepGroup,
};
use super::config::{Arch, Config};
use super::weights::{Key, WeightSource};
use super::LanguageModel;
use candle_core::Tensor;

use crate::error::Result;

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen2: the Q, K and V biases.
    bias: Option<[Tensor; 3]>,
    /// Qwen3: RMSNorm of each head's query and key, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    interleaved: bool,
}

impl Attention {
    fn load(src: &dyn WeightSource, l: usize, cfg: &Config) -> Result<Self> {
        Ok(Self {
            q: linear(src, Key::Q(l), cfg)?,
            k: linear(src, Key::K(l), cfg)?,
            v: linear(src, Key::V(l), cfg)?,
            o: linear(src, Key::O(l), cfg)?,
            bias: match cfg.arch {
                Arch::Qwen2 => Some([bias(src, Key::QBias(l), cfg)?, bias(src, Key::KBias(l), cfg)?, bias(src, Key::VBias(l), cfg)?]),
                _ => None,
            },
            qk_norm: match cfg.arch {
                Arch::Qwen3 => Some((RmsNorm::load(src, Key::QNorm(l), cfg)?, RmsNorm::load(src, Key::KNorm(l), cfg)?)),
                _ => None,
            },
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            interleaved: cfg.rope_interleaved,
        })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(if self.interleaved { candle_nn::rotary_emb::rope_i(&x, cos, sin)? } else { candle_nn::rotary_emb::rope(&x, cos, sin)? })
    }

    fn forward(&self, x: &Tensor, pos: &[Pos], segs: &mut [Segment]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (mut q, mut k, mut v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        if let Some([bq, bk, bv]) = &self.bias {
            (q, k, v) = (q.broadcast_add(bq)?, k.broadcast_add(bk)?, v.broadcast_add(bv)?);
        }
        let mut q = q.reshape((b, t, self.n_heads, self.head_dim))?.transpose(1, 2)?;
        let mut k = k.reshape((b, t, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let v = v.reshape((b, t, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        if let Some((qn, kn)) = &self.qk_norm {
            (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = attend_segments(&q, &k, &v, segs, pos, |x, cos, sin| self.rope(x, cos, sin), self.n_heads / self.n_kv_heads, scale, None)?;
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_heads * self.head_dim))?;
        self.o.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(src: &dyn WeightSource, l: usize, cfg: &Config) -> Result<Self> {
        Ok(Self {
            attn_norm: RmsNorm::load(src, Key::AttnNorm(l), cfg)?,
            attn: Attention::load(src, l, cfg)?,
            ffn_norm: RmsNorm::load(src, Key::FfnNorm(l), cfg)?,
            mlp: Mlp::load(src, l, cfg, Act::Silu)?,
        })
    }

    fn forward(&self, x: Tensor, pos: &[Pos], segs: &mut [Segment], mlp: &mut MlpSite) -> Result<Tensor> {
        let x = (&x + self.attn.forward(&self.attn_norm.forward(&x)?, pos, segs)?)?;
        Ok((&x + mlp.forward(&self.mlp, &self.ffn_norm.forward(&x)?)?)?)
    }
}

/// A loaded Llama-architecture model. Immutable: share it in an `Arc`.
#[derive(Debug)]
pub struct Llama {
    shell: Shell,
    blocks: Vec<Block>,
    /// RoPE tables `(cos, sin)`.
    rope: (Tensor, Tensor),
}

impl Llama {
    pub fn load(src: &dyn WeightSource, cfg: &Config) -> Result<Self> {
        let shell = Shell::load(src, cfg)?;
        let blocks = (0..cfg.n_layers).map(|l| Block::load(src, l, cfg)).collect::<Result<Vec<_>>>()?;
        let rope = rope_tables(cfg.inv_freqs(), cfg.max_seq_len, shell.dtype, &shell.device)?;
        Ok(Self { shell, blocks, rope })
    }
}

impl LanguageModel for Llama {
    fn shell(&self) -> &Shell {
        &self.shell
    }
    fn mlp(&self, layer: usize) -> &Mlp {
        &self.blocks[layer].mlp
    }

    fn weight_bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.attn.q, &b.attn.k, &b.attn.v, &b.attn.o].into_iter().map(Linear::bytes).sum::<usize>()
                    + b.mlp.bytes()
                    + tensor_bytes(&b.attn_norm.weight)
                    + tensor_bytes(&b.ffn_norm.weight)
            })
            .sum();
        blocks + self.shell.bytes()
    }

    fn run(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput> {
        let sh = &self.shell;
        let (_, t, n_rows, offset) = check_forward(&sh.cfg, input, cache, rows)?;
        let mask = if t > 1 { Some(causal_mask(t, offset, sh.dtype, &sh.device)?) } else { None };
        let pos = [Pos::at(&self.rope, offset, t, mask)?];
        let x = sh.embed(input)?;
        let (x, acts) = run_layers(x, cache, rows, record, n_rows, |l, x, segs, mlp| self.blocks[l].forward(x, &pos, segs, mlp))?;
        Ok(ForwardOutput { logits: sh.logits(&x, t)?, mlp_acts: acts })
    }

    fn run_step(&self, groups: &mut [StepGroup]) -> Result<Tensor> {
        let sh = &self.shell;
        let (input, rows) = check_step(&sh.cfg, groups, &sh.device)?;
        let pos = groups.iter().map(|g| Pos::at(&self.rope, g.cache.seq_len(), 1, None)).collect::<Result<Vec<_>>>()?;
        let x = sh.embed(&input)?;
        let x = run_step_layers(x, groups, &rows, |l, x, segs, mlp| self.blocks[l].forward(x, &pos, segs, mlp))?;
        sh.logits(&x, 1)
    }
}

/// A bias vector, checked against the shape the configuration implies.
fn bias(src: &dyn WeightSource, key: Key, cfg: &Config) -> Result<Tensor> {
    let b = src.dense(key)?;
    super::common::check_shape(src, key, b.dims(), cfg)?;
    Ok(b)
}
