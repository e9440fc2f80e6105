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
    attend_segments, causal_mask, check_forward, check_step, linear, make_room, rope, rope_tables, run_layers, run_step_layers, tensor_bytes, Act,
    Cache, ForwardOutput, Intervention, Linear, Mlp, MlpSite, Pos, RmsNorm, Room, Segment, Shell, StepGroup,
};
use super::config::{Arch, Config};
use super::fused::{self, Heads};
use super::weights::{Key, WeightSource};
use super::LanguageModel;
use candle_core::quantized::QMatMul;
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
        rope(x, cos, sin, self.interleaved)
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
    /// The projections stacked for fused decoding steps (see [`fused`]), when it is on.
    stacked: Option<Stacked>,
}

/// A block's Q·K·V and gate·up weights, each one product; the block's own `q`, `k`, `v`,
/// `gate` and `up` are then views of these (no second copy of the weights).
#[derive(Debug, Clone)]
struct Stacked {
    qkv: Linear,
    gate_up: Linear,
}

impl Stacked {
    /// The stacked weights of a plain Llama block with dense weights whose heads fit the
    /// kernels, and the block's own weights made views of them; `None` for any other block.
    fn of(attn: &mut Attention, mlp: &mut Mlp) -> Result<Option<Self>> {
        let dense = |l: &Linear| match l {
            Linear::Candle(QMatMul::Tensor(w)) if w.rank() == 2 => Some(w.clone()),
            _ => None,
        };
        let (Some(q), Some(k), Some(v), Some(g), Some(u)) = (dense(&attn.q), dense(&attn.k), dense(&attn.v), dense(&mlp.gate), dense(&mlp.up)) else {
            return Ok(None);
        };
        // Each stack is one tensor: one dtype, one input width.
        let same = |ws: &[&Tensor]| ws.iter().all(|w| w.dtype() == ws[0].dtype() && w.dim(1).ok() == ws[0].dim(1).ok());
        if attn.bias.is_some() || attn.qk_norm.is_some() || !fused::head_dim_fits(attn.head_dim) || !same(&[&q, &k, &v]) || !same(&[&g, &u]) {
            return Ok(None);
        }
        let qkv = Tensor::cat(&[&q, &k, &v], 0)?;
        let gate_up = Tensor::cat(&[&g, &u], 0)?;
        let view = |w: &Tensor, at: usize, n: usize| -> Result<Linear> { Ok(Linear::Candle(QMatMul::Tensor(w.narrow(0, at, n)?))) };
        let (nq, nk, nv, ng) = (q.dim(0)?, k.dim(0)?, v.dim(0)?, g.dim(0)?);
        (attn.q, attn.k, attn.v) = (view(&qkv, 0, nq)?, view(&qkv, nq, nk)?, view(&qkv, nq + nk, nv)?);
        (mlp.gate, mlp.up) = (view(&gate_up, 0, ng)?, view(&gate_up, ng, u.dim(0)?)?);
        Ok(Some(Self { qkv: Linear::Candle(QMatMul::Tensor(qkv)), gate_up: Linear::Candle(QMatMul::Tensor(gate_up)) }))
    }
}

impl Block {
    fn load(src: &dyn WeightSource, l: usize, cfg: &Config, fuse: bool) -> Result<Self> {
        let (mut attn, mut mlp) = (Attention::load(src, l, cfg)?, Mlp::load(src, l, cfg, Act::Silu)?);
        let stacked = if fuse { Stacked::of(&mut attn, &mut mlp)? } else { None };
        Ok(Self { attn_norm: RmsNorm::load(src, Key::AttnNorm(l), cfg)?, attn, ffn_norm: RmsNorm::load(src, Key::FfnNorm(l), cfg)?, mlp, stacked })
    }

    /// The block on the residual stream `x`. A fused decoding step also takes `x` already normed
    /// by this block's `attn_norm` (`normed`, from the block before: used when its shape is
    /// `x`'s) and, given the next block's `attn_norm`, returns the stream normed by it too, its
    /// residual add and that norm being one kernel.
    fn forward(
        &self,
        x: Tensor,
        pos: &[Pos],
        segs: &mut [Segment],
        mlp: &mut MlpSite,
        normed: Option<Tensor>,
        next_norm: Option<&RmsNorm>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(st) = &self.stacked {
            // A decoding step (one position per row, every row keeping its cache).
            if x.dim(1)? == 1
                && segs.iter().all(|s| s.room != Room::Scratch)
                && pos.iter().all(|p| p.step.is_some() && p.mask.is_none() && p.window.is_none())
            {
                let normed = normed.filter(|h| h.dims() == x.dims());
                return self.step_fused(st, x, pos, segs, mlp, normed, next_norm);
            }
        }
        let x = (&x + self.attn.forward(&self.attn_norm.forward(&x)?, pos, segs)?)?;
        Ok(((&x + mlp.forward(&self.mlp, &self.ffn_norm.forward(&x)?)?)?, None))
    }

    /// [`Block::forward`] of one position per row through the fused ops: the stacked Q·K·V
    /// product, RoPE with the cache writes, attention, the output projection, the residual add
    /// with the MLP's norm, the stacked gate·up product, SiLU·up, the down projection, and its
    /// residual add (with the next block's norm, when given).
    #[allow(clippy::too_many_arguments)]
    fn step_fused(
        &self,
        st: &Stacked,
        x: Tensor,
        pos: &[Pos],
        segs: &mut [Segment],
        mlp: &mut MlpSite,
        normed: Option<Tensor>,
        next_norm: Option<&RmsNorm>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let a = &self.attn;
        let heads = Heads { h: a.n_heads, kvh: a.n_kv_heads, d: a.head_dim, interleaved: a.interleaved };
        let normed = match normed {
            Some(h) => h,
            None => self.attn_norm.forward(&x)?,
        };
        let qkv = st.qkv.forward(&normed)?;
        let scale = 1.0 / (a.head_dim as f64).sqrt();
        let (n, mut ys, mut at) = (segs.len(), Vec::with_capacity(segs.len()), 0);
        for s in segs.iter_mut() {
            let part = if n == 1 { qkv.clone() } else { qkv.narrow(0, at, s.rows)? };
            let Some((tables, dev)) = &pos[s.group].step else {
                return Err(crate::error::Error::bad("a fused decoding step without its position on the device"));
            };
            let c = make_room(s.kv, (s.rows, heads.kvh, heads.d), 1, s.room, None, qkv.dtype(), qkv.device())?
                .expect("a layer without a window always makes room");
            let slot = fused::Slot { at: c.len, dev };
            let q = fused::rope_append(&part, tables, slot, &c.k, &c.v, heads)?;
            ys.push(fused::attend(&q, &c.k, &c.v, slot, scale)?);
            c.len += 1;
            at += s.rows;
        }
        let y = if n == 1 { ys.pop().expect("one segment") } else { Tensor::cat(&ys, 0)? };
        let (x, h) = fused::add_rms_norm(&x, &a.o.forward(&y)?, &self.ffn_norm.weight, self.ffn_norm.eps as f32)?;
        let hidden = fused::silu_mul(&st.gate_up.forward(&h)?)?;
        let down = mlp.down(&self.mlp, &hidden)?;
        Ok(match next_norm {
            Some(n) => {
                let (x, h) = fused::add_rms_norm(&x, &down, &n.weight, n.eps as f32)?;
                (x, Some(h))
            }
            None => ((&x + down)?, None),
        })
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
    /// The model, with fused decoding steps where [`fused::wanted`] says so.
    pub fn load(src: &dyn WeightSource, cfg: &Config) -> Result<Self> {
        Self::load_with(src, cfg, fused::wanted(src.device()))
    }

    /// The model, with fused decoding steps (on any device) or not.
    pub fn load_with(src: &dyn WeightSource, cfg: &Config, fuse: bool) -> Result<Self> {
        let shell = Shell::load(src, cfg)?;
        let blocks = (0..cfg.n_layers).map(|l| Block::load(src, l, cfg, fuse)).collect::<Result<Vec<_>>>()?;
        let rope = rope_tables(cfg.inv_freqs(), cfg.max_seq_len, shell.dtype, &shell.device)?;
        Ok(Self { shell, blocks, rope })
    }
}

impl Llama {
    /// The layer loop's step (`layer(l, x, segments, mlp)` of [`run_layers`]): block `l`, which
    /// in a fused decoding step hands the stream normed by the next block's `attn_norm` on to it.
    fn layers<'a>(&'a self, pos: &'a [Pos]) -> impl FnMut(usize, Tensor, &mut [Segment], &mut MlpSite) -> Result<Tensor> + 'a {
        let mut normed = None;
        move |l, x, segs, mlp| {
            let next = self.blocks.get(l + 1).filter(|b| b.stacked.is_some()).map(|b| &b.attn_norm);
            let (x, h) = self.blocks[l].forward(x, pos, segs, mlp, normed.take(), next)?;
            normed = h;
            Ok(x)
        }
    }
}

impl LanguageModel for Llama {
    fn shell(&self) -> &Shell {
        &self.shell
    }
    fn mlp(&self, layer: usize) -> &Mlp {
        &self.blocks[layer].mlp
    }

    fn fused_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.stacked.is_some()).count()
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
        let pos = [if t == 1 && self.fused_blocks() > 0 { Pos::step(&self.rope, cache, &sh.device)? } else { Pos::at(&self.rope, offset, t, mask)? }];
        let x = sh.embed(input)?;
        let (x, acts) = run_layers(x, cache, rows, record, n_rows, self.layers(&pos))?;
        Ok(ForwardOutput { logits: sh.logits(&x, t)?, mlp_acts: acts })
    }

    fn run_step(&self, groups: &mut [StepGroup]) -> Result<Tensor> {
        let sh = &self.shell;
        let (input, rows) = check_step(&sh.cfg, groups, &sh.device)?;
        let fused = self.fused_blocks() > 0;
        let pos = groups
            .iter_mut()
            .map(|g| if fused { Pos::step(&self.rope, g.cache, &sh.device) } else { Pos::at(&self.rope, g.cache.seq_len(), 1, None) })
            .collect::<Result<Vec<_>>>()?;
        let x = sh.embed(&input)?;
        let x = run_step_layers(x, groups, &rows, self.layers(&pos))?;
        sh.logits(&x, 1)
    }
}

/// A bias vector, checked against the shape the configuration implies.
fn bias(src: &dyn WeightSource, key: Key, cfg: &Config) -> Result<Tensor> {
    let b = src.dense(key)?;
    super::common::check_shape(src, key, b.dims(), cfg)?;
    Ok(b)
}
