//! Our own Llama forward pass. candle-transformers' Llama hides the MLP, and we need to reach inside
//! it: read and clamp the gated activation act(gate(x)) * up(x), the input of down_proj.
//!
//! The model is immutable and shared in an `Arc`; the KV cache is passed in per request and the
//! intervention is plain data, so one loaded model serves many requests at once.
//! Order as in candle's model files: cache, intervention, blocks, the public model.

use super::config::Config;
use super::weights::{Key, WeightSource};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};

use crate::cancel::Cancel;
use crate::error::{Error, Result};

/// Per-request key/value cache: one entry per layer, `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct Cache {
    kvs: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
    /// Checked before every layer: a cancelled request stops within one layer's work.
    cancel: Cancel,
}

impl Cache {
    pub fn new(cfg: &Config) -> Self {
        Self::with_cancel(cfg, Cancel::default())
    }
    pub fn with_cancel(cfg: &Config, cancel: Cancel) -> Self {
        Self { kvs: vec![None; cfg.n_layers], seq_len: 0, cancel }
    }
    /// Number of positions already in the cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
}

/// Force neuron `neuron` of MLP layer `layer` to `value` at every position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clamp {
    pub layer: usize,
    pub neuron: usize,
    pub value: f32,
}

/// What to change in one run of the model: a set of clamps (several at once are allowed).
/// The empty intervention is the plain model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Intervention {
    pub clamps: Vec<Clamp>,
}

impl Intervention {
    pub fn none() -> Self {
        Self::default()
    }
    pub fn is_empty(&self) -> bool {
        self.clamps.is_empty()
    }
    fn touches(&self, layer: usize) -> bool {
        self.clamps.iter().any(|c| c.layer == layer)
    }
}

/// Output of one forward call.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Logits of the last position of each batch row, `[batch, vocab]`, f32.
    pub logits: Tensor,
    /// MLP hidden activations (after any clamp) of the layers asked for in `record`,
    /// each `[batch, seq, d_ff]`, f32.
    pub mlp_acts: Vec<(usize, Tensor)>,
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(src: &dyn WeightSource, key: Key, cfg: &Config) -> Result<Self> {
        let weight = src.vector(key)?;
        check_shape(src, key, weight.dims(), cfg)?;
        Ok(Self { weight, eps: cfg.rms_eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
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

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, kv: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let q = self.q.forward(x)?.reshape((b, t, self.n_heads, self.head_dim))?.transpose(1, 2)?;
        let k = self.k.forward(x)?.reshape((b, t, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let v = self.v.forward(x)?.reshape((b, t, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?;
        let v = v.contiguous()?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let n_rep = self.n_heads / self.n_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, self.n_heads * self.head_dim))?;
        Ok(self.o.forward(&y)?)
    }
}

/// The gated MLP: down(act(gate(x)) * up(x)). `hidden` is the neuron activation we read and clamp.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: QMatMul,
    pub up: QMatMul,
    pub down: QMatMul,
}

impl Mlp {
    fn load(src: &dyn WeightSource, l: usize, cfg: &Config) -> Result<Self> {
        Ok(Self { gate: linear(src, Key::Gate(l), cfg)?, up: linear(src, Key::Up(l), cfg)?, down: linear(src, Key::Down(l), cfg)? })
    }

    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        Ok((g * self.up.forward(x)?)?)
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
            mlp: Mlp::load(src, l, cfg)?,
        })
    }
}

/// A loaded Llama-architecture model. Immutable: share it in an `Arc`.
#[derive(Debug)]
pub struct Llama {
    cfg: Config,
    /// Token embedding, `[vocab, d_model]`, in the compute dtype.
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

impl Llama {
    pub fn load(src: &dyn WeightSource, cfg: &Config) -> Result<Self> {
        let device = src.device().clone();
        cfg.check().map_err(|e| Error::model(src.origin(), e))?;
        let embed = src.dense(Key::Embed)?;
        check_shape(src, Key::Embed, embed.dims(), cfg)?;
        let dtype = embed.dtype();
        let blocks = (0..cfg.n_layers).map(|l| Block::load(src, l, cfg)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, Key::OutNorm, cfg)?;
        let lm_head = if cfg.tied_embeddings { src.tied_head()? } else { linear(src, Key::Output, cfg)? };
        let inv = cfg.inv_freqs();
        let half = inv.len();
        let inv = Tensor::from_vec(inv, (1, half), &device)?;
        let pos = Tensor::arange(0u32, cfg.max_seq_len as u32, &device)?.to_dtype(DType::F32)?.reshape((cfg.max_seq_len, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        let cos = angles.cos()?.to_dtype(dtype)?;
        let sin = angles.sin()?.to_dtype(dtype)?;
        Ok(Self { cfg: cfg.clone(), embed, blocks, norm, lm_head, cos, sin, device, dtype })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Token embedding matrix `[vocab, d_model]` (the LM head too when tied).
    pub fn embedding(&self) -> &Tensor {
        &self.embed
    }
    /// The unembedding `W_U` as a dense `[vocab, d_model]` tensor.
    pub fn lm_head_weight(&self) -> Result<Tensor> {
        dense_weight(&self.lm_head)
    }
    /// Final RMSNorm weight `[d_model]`.
    pub fn final_norm_weight(&self) -> &Tensor {
        &self.norm.weight
    }
    /// MLP weights of one layer as dense tensors: gate `[d_ff, d_model]`, up `[d_ff, d_model]`,
    /// down `[d_model, d_ff]`.
    pub fn mlp_weights(&self, layer: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let m = &self.blocks[layer].mlp;
        Ok((dense_weight(&m.gate)?, dense_weight(&m.up)?, dense_weight(&m.down)?))
    }

    /// Bytes of every weight a forward pass reads, as held in memory (the token embedding is
    /// only indexed, unless it is also the tied LM head).
    pub fn weight_bytes(&self) -> usize {
        let w = |w: &QMatMul| match w {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
        };
        let v = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.attn.q, &b.attn.k, &b.attn.v, &b.attn.o, &b.mlp.gate, &b.mlp.up, &b.mlp.down].into_iter().map(w).sum::<usize>()
                    + v(&b.attn_norm.weight)
                    + v(&b.ffn_norm.weight)
            })
            .sum();
        blocks + w(&self.lm_head) + v(&self.norm.weight)
    }

    /// Check an intervention against the model's shape.
    pub fn validate(&self, iv: &Intervention) -> Result<()> {
        for c in &iv.clamps {
            crate::limits::check_clamp(c.layer, c.neuron, c.value, &self.cfg)?;
        }
        Ok(())
    }

    /// Run `input` (`[b, t]` u32 token ids) through the model, appending to `cache`.
    ///
    /// `rows` gives one intervention per batch row, or a single one for all rows. If `input` has
    /// one row and `rows` has `n > 1`, the batch is expanded to `n` at the first layer where the
    /// rows differ: the shared prefix of the computation runs once (used by sweeps and by paired
    /// normal/steered generation). `record` lists layers whose MLP activations are returned.
    pub fn forward(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput> {
        let out = self.forward_rows(input, cache, rows, record)?;
        if !all_finite(&out.logits)? {
            return Err(Error::NonFinite("the model's output is not a finite number for this input (an overflow: try smaller clamp values)".into()));
        }
        Ok(out)
    }

    /// [`Llama::forward`] without the check that every row's logits are finite: for callers that
    /// judge each row on its own (a batch of many clamps where one extreme value may overflow).
    pub fn forward_rows(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput> {
        let (b_in, t) = input.dims2()?;
        if t == 0 {
            return Err(Error::bad("empty input: at least one token is needed"));
        }
        let n_rows = rows.len().max(1);
        if rows.len() > 1 && b_in != 1 && b_in != rows.len() {
            return Err(Error::bad(format!("{} interventions for a batch of {b_in}", rows.len())));
        }
        for iv in rows {
            self.validate(iv)?;
        }
        let offset = cache.seq_len;
        if offset + t > self.cfg.max_seq_len {
            return Err(Error::TooLarge(format!("{} tokens exceed the model's context of {} tokens", offset + t, self.cfg.max_seq_len)));
        }
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let mask = if t > 1 { Some(causal_mask(t, offset, self.dtype, &self.device)?) } else { None };

        let mut x = self.embed.embedding(&input.flatten_all()?)?.reshape((b_in, t, self.cfg.d_model))?;
        let mut batch = b_in;
        let mut acts = Vec::new();
        for (l, block) in self.blocks.iter().enumerate() {
            cache.cancel.check()?;
            if batch == 1 && n_rows > 1 && rows.iter().any(|iv| iv.touches(l)) {
                x = self.expand(&x, cache, l, n_rows)?;
                batch = n_rows;
            }
            let h = block.attn.forward(&block.attn_norm.forward(&x)?, &cos, &sin, mask.as_ref(), &mut cache.kvs[l])?;
            x = (x + h)?;
            let mut hidden = block.mlp.hidden(&block.ffn_norm.forward(&x)?)?;
            hidden = apply_clamps(&hidden, l, rows, batch)?;
            if record.contains(&l) {
                acts.push((l, hidden.to_dtype(DType::F32)?));
            }
            x = (x + block.mlp.down.forward(&hidden)?)?;
        }
        if batch == 1 && n_rows > 1 {
            x = self.expand(&x, cache, self.cfg.n_layers, n_rows)?;
        }
        cache.seq_len += t;
        let last = x.narrow(1, t - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?.squeeze(1)?.to_dtype(DType::F32)?;
        Ok(ForwardOutput { logits, mlp_acts: acts })
    }

    /// Repeat the residual stream and the caches of layers `< upto` from one row to `n` rows.
    fn expand(&self, x: &Tensor, cache: &mut Cache, upto: usize, n: usize) -> Result<Tensor> {
        for kv in cache.kvs.iter_mut().take(upto) {
            if let Some((k, v)) = kv.take() {
                *kv = Some((k.repeat((n, 1, 1, 1))?, v.repeat((n, 1, 1, 1))?));
            }
        }
        Ok(x.repeat((n, 1, 1))?)
    }
}

/// Set clamped neurons of `hidden` (`[b, t, d_ff]`) to their values for the rows that ask for it.
fn apply_clamps(hidden: &Tensor, layer: usize, rows: &[Intervention], batch: usize) -> Result<Tensor> {
    if !rows.iter().any(|iv| iv.touches(layer)) {
        return Ok(hidden.clone());
    }
    let (_, t, d_ff) = hidden.dims3()?;
    // Build per-row masks: a single intervention applies to every row.
    let row_of = |r: usize| if rows.len() == 1 { &rows[0] } else { &rows[r] };
    let mut mask = vec![0u8; batch * d_ff];
    let mut vals = vec![0f32; batch * d_ff];
    for r in 0..batch {
        for c in row_of(r).clamps.iter().filter(|c| c.layer == layer) {
            mask[r * d_ff + c.neuron] = 1;
            vals[r * d_ff + c.neuron] = c.value;
        }
    }
    let dev = hidden.device();
    let shape = (batch, t, d_ff);
    let mask = Tensor::from_vec(mask, (batch, 1, d_ff), dev)?.broadcast_as(shape)?;
    let vals = Tensor::from_vec(vals, (batch, 1, d_ff), dev)?.to_dtype(hidden.dtype())?.broadcast_as(shape)?;
    Ok(mask.where_cond(&vals, hidden)?)
}

fn causal_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..total).map(move |j| if j > i + offset { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?)
}

/// A linear layer's weight, checked against the shape the configuration implies.
fn linear(src: &dyn WeightSource, key: Key, cfg: &Config) -> Result<QMatMul> {
    let w = src.linear(key)?;
    let dims = match &w {
        QMatMul::QTensor(q) => q.shape().dims().to_vec(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims().to_vec(),
    };
    check_shape(src, key, &dims, cfg)?;
    Ok(w)
}

/// A weight whose shape is not what the model's settings say is a corrupt or foreign file: refused
/// (otherwise clamps or maps would index past the real activations).
fn check_shape(src: &dyn WeightSource, key: Key, dims: &[usize], cfg: &Config) -> Result<()> {
    let want = key.shape(cfg);
    if dims != want.as_slice() {
        return Err(Error::model(src.origin(), format!("tensor {} has shape {dims:?}, but the model's settings say {want:?}", src.name(key))));
    }
    Ok(())
}

/// Whether every value of `t` is finite: `x - x` is 0 for finite x and NaN for NaN or ±inf, so
/// one sum tells, and only one scalar leaves the device.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(DType::F32)?;
    Ok(t.sub(&t)?.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// A weight as a dense tensor, whatever its storage (quantized weights are dequantized to f32).
pub fn dense_weight(w: &QMatMul) -> Result<Tensor> {
    Ok(match w {
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
        QMatMul::QTensor(q) => q.dequantize(&q.device())?,
    })
}

/// Softmax over the last dimension, in f32.
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?)
}
