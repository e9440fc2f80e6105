//! Our own Gemma 3 forward pass, written like `llama.rs` (and checked against
//! candle-transformers' `gemma3`): GeGLU with the tanh GELU, RMSNorm before and after both
//! sublayers, per-head q/k norms, token embeddings scaled by √d, and local sliding-window layers
//! with their own RoPE base between the global ones. The clamp is at the same site as Llama's:
//! the MLP activation gelu(gate(x)) * up(x), the input of down_proj.
//!
//! Gemma 2 runs here too (checked against candle-transformers' `gemma2`): the same blocks without
//! the q/k norms, with soft-capped attention scores and logits, and alternating local layers.
//!
//! Norm weights arrive as the scale itself (`1 + w`): llama.cpp stores that in a GGUF, and the
//! safetensors source adds the 1.

use super::common::{
    attend_segments, check_forward, check_step, linear, rope_tables, run_layers, run_step_layers, tensor_bytes, window_mask, Act, Cache,
    ForwardOutput, Intervention, Linear, Mlp, MlpSite, Pos, RmsNorm, Segment, Shell, StepGroup,
};
use super::config::{Arch, Config, Gemma3Params};
use super::weights::{Key, WeightSource};
use super::LanguageModel;
use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Gemma 3's per-head query and key norms (Gemma 2 has none).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    softcap: Option<f32>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(src: &dyn WeightSource, l: usize, cfg: &Config, p: &Gemma3Params) -> Result<Self> {
        Ok(Self {
            q: linear(src, Key::Q(l), cfg)?,
            k: linear(src, Key::K(l), cfg)?,
            v: linear(src, Key::V(l), cfg)?,
            o: linear(src, Key::O(l), cfg)?,
            qk_norm: match cfg.arch {
                Arch::Gemma3(_) => Some((RmsNorm::load(src, Key::QNorm(l), cfg)?, RmsNorm::load(src, Key::KNorm(l), cfg)?)),
                _ => None,
            },
            softcap: p.attn_logit_softcap,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            scale: 1.0 / (p.query_pre_attn_scalar as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor, pos: &[Pos], segs: &mut [Segment]) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.q.forward(x)?.reshape((b, t, self.n_heads, self.head_dim))?.transpose(1, 2)?;
        let k = self.k.forward(x)?.reshape((b, t, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let v = self.v.forward(x)?.reshape((b, t, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        // Both Hugging Face and llama.cpp (NEOX mode) rotate Gemma's split halves.
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q.contiguous()?, k.contiguous()?),
        };
        let rope = |x: &Tensor, cos: &Tensor, sin: &Tensor| super::common::rope(x, cos, sin, false);
        let y = attend_segments(&q, &k, &v, segs, pos, rope, self.n_heads / self.n_kv_heads, self.scale, self.softcap)?;
        let y = y.transpose(1, 2)?.reshape((b, t, self.n_heads * self.head_dim))?;
        self.o.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    post_ffn_norm: RmsNorm,
    global: bool,
}

impl Block {
    fn load(src: &dyn WeightSource, l: usize, cfg: &Config, p: &Gemma3Params) -> Result<Self> {
        Ok(Self {
            attn_norm: RmsNorm::load(src, Key::AttnNorm(l), cfg)?,
            attn: Attention::load(src, l, cfg, p)?,
            post_attn_norm: RmsNorm::load(src, Key::PostAttnNorm(l), cfg)?,
            ffn_norm: RmsNorm::load(src, Key::FfnNorm(l), cfg)?,
            mlp: Mlp::load(src, l, cfg, Act::GeluTanh)?,
            post_ffn_norm: RmsNorm::load(src, Key::PostFfnNorm(l), cfg)?,
            global: p.is_global(l),
        })
    }

    /// One block, with each group's positions on global layers (`global`) and local ones (`local`).
    fn forward(&self, x: Tensor, global: &[Pos], local: &[Pos], segs: &mut [Segment], mlp: &mut MlpSite) -> Result<Tensor> {
        let pos = if self.global { global } else { local };
        let h = self.attn.forward(&self.attn_norm.forward(&x)?, pos, segs)?;
        let x = (&x + self.post_attn_norm.forward(&h)?)?;
        let m = mlp.forward(&self.mlp, &self.ffn_norm.forward(&x)?)?;
        Ok((&x + self.post_ffn_norm.forward(&m)?)?)
    }
}

/// A loaded Gemma 3 model. Immutable: share it in an `Arc`.
#[derive(Debug)]
pub struct Gemma3 {
    shell: Shell,
    params: Gemma3Params,
    /// √d_model, in the compute dtype, as Hugging Face rounds it.
    embed_scale: f64,
    blocks: Vec<Block>,
    /// RoPE tables of the global layers and of the local ones.
    global_rope: (Tensor, Tensor),
    local_rope: (Tensor, Tensor),
}

impl Gemma3 {
    pub fn load(src: &dyn WeightSource, cfg: &Config) -> Result<Self> {
        let Some(params) = cfg.arch.gemma() else {
            return Err(Error::model(src.origin(), "not a Gemma configuration"));
        };
        let shell = Shell::load(src, cfg)?;
        let (dtype, device) = (shell.dtype, &shell.device);
        let blocks = (0..cfg.n_layers).map(|l| Block::load(src, l, cfg, params)).collect::<Result<Vec<_>>>()?;
        let global_inv = cfg.inv_freqs().into_iter().map(|f| f / params.global_rope_factor).collect();
        let global_rope = rope_tables(global_inv, cfg.max_seq_len, dtype, device)?;
        let local_rope = rope_tables(cfg.inv_freqs_with_base(params.rope_local_theta), cfg.max_seq_len, dtype, device)?;
        // Hugging Face multiplies by the scale cast to the model's dtype.
        let embed_scale = Tensor::new(&[(cfg.d_model as f32).sqrt()], device)?.to_dtype(dtype)?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        Ok(Self { shell, params: params.clone(), embed_scale, blocks, global_rope, local_rope })
    }

    /// Positions `offset..offset + t` on the global layers and on the local ones.
    fn positions(&self, offset: usize, t: usize) -> Result<(Pos, Pos)> {
        let sh = &self.shell;
        let global_mask = if t > 1 { Some(window_mask(t, offset, None, sh.dtype, &sh.device)?) } else { None };
        // One position on a local layer needs no mask either: attention reads only its window's keys.
        let window = self.params.sliding_window;
        let local_mask = if t > 1 { Some(window_mask(t, offset, Some(window), sh.dtype, &sh.device)?) } else { None };
        Ok((Pos::at(&self.global_rope, offset, t, global_mask)?, Pos::windowed(&self.local_rope, offset, t, local_mask, window)?))
    }

    /// Logits of the last of `t` positions, soft-capped when the model asks for it (Gemma 2).
    fn logits(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let logits = self.shell.logits(x, t)?;
        Ok(match self.params.final_logit_softcap {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
            None => logits,
        })
    }
}

impl LanguageModel for Gemma3 {
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
                    + [&b.attn_norm, &b.post_attn_norm, &b.ffn_norm, &b.post_ffn_norm].into_iter().map(|n| tensor_bytes(&n.weight)).sum::<usize>()
            })
            .sum();
        blocks + self.shell.bytes()
    }

    fn run(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput> {
        let sh = &self.shell;
        let (_, t, n_rows, offset) = check_forward(&sh.cfg, input, cache, rows)?;
        let (global, local) = self.positions(offset, t)?;
        let x = (sh.embed(input)? * self.embed_scale)?;
        let (x, acts) = run_layers(x, cache, rows, record, n_rows, |l, x, segs, mlp| {
            self.blocks[l].forward(x, std::slice::from_ref(&global), std::slice::from_ref(&local), segs, mlp)
        })?;
        Ok(ForwardOutput { logits: self.logits(&x, t)?, mlp_acts: acts })
    }

    fn run_step(&self, groups: &mut [StepGroup]) -> Result<Tensor> {
        let sh = &self.shell;
        let (input, rows) = check_step(&sh.cfg, groups, &sh.device)?;
        let (global, local): (Vec<Pos>, Vec<Pos>) =
            groups.iter().map(|g| self.positions(g.cache.seq_len(), 1)).collect::<Result<Vec<_>>>()?.into_iter().unzip();
        let x = (sh.embed(&input)? * self.embed_scale)?;
        let x = run_step_layers(x, groups, &rows, |l, x, segs, mlp| self.blocks[l].forward(x, &global, &local, segs, mlp))?;
        self.logits(&x, 1)
    }
}
