//! What every model family shares: the per-request cache, the intervention (plain data), the
//! forward output, RMSNorm, the clamp and the masks, and the checks a weight passes at load.

use super::config::Config;
use super::weights::{Key, WeightMode, WeightSource};
use std::sync::Arc;

use super::exact::ExactLinear;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};

use crate::cancel::Cancel;
use crate::error::{Error, Result};

/// Per-request key/value cache: one entry per layer, `[batch, kv_heads, seq, head_dim]`.
/// Not `Clone`: appending writes into its buffers in place, so two copies would share them.
#[derive(Debug)]
pub struct Cache {
    pub(crate) kvs: Vec<Option<LayerKv>>,
    pub(crate) seq_len: usize,
    /// Checked before every layer: a cancelled request stops within one layer's work.
    pub(crate) cancel: Cancel,
    pub(crate) room: Room,
    /// The position the next decoding step writes, on the device (`[1]`, u32), with the value it
    /// holds: the fused step's kernels read it there ([`Cache::step_slot`]).
    slot: Option<(Tensor, usize)>,
}

/// How a [`Cache`] makes room for the keys and values of new positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Twice what it then holds, each time it is full: decoding of unknown length.
    Grow,
    /// This many positions at once: a generation, whose prompt and longest answer are known.
    Positions(usize),
    /// Nothing kept: one forward pass whose keys and values serve only its own attention (a
    /// next-token's or a sweep's prompt). A layer's keys and values are freed after the layer,
    /// and a sweep's rows never copy those of the layers below their clamp.
    Scratch,
}

impl Cache {
    pub fn new(cfg: &Config) -> Self {
        Self::with_cancel(cfg, Cancel::default())
    }
    pub fn with_cancel(cfg: &Config, cancel: Cancel) -> Self {
        Self { kvs: (0..cfg.n_layers).map(|_| None).collect(), seq_len: 0, cancel, room: Room::Grow, slot: None }
    }
    /// The same cache, making room as `room` says (see [`Room`]).
    pub fn with_room(mut self, room: Room) -> Self {
        self.room = room;
        self
    }
    /// Number of positions already in the cache.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The position the next step writes (the cache's length), held on `device` (`[1]`, u32) for
    /// the fused step's kernels: one tensor kept across steps and written in place only when it
    /// holds another position, so that a CUDA graph captured with it replays at whatever
    /// position was written last.
    pub(crate) fn step_slot(&mut self, device: &Device) -> Result<Tensor> {
        let at = self.seq_len;
        let value = u32::try_from(at).map_err(|_| Error::bad(format!("position {at} is past what a step can address")))?;
        match &mut self.slot {
            Some((t, held)) if t.device().same_device(device) => {
                if *held != at {
                    t.slice_set(&Tensor::new(&[value], device)?, 0, 0)?;
                    *held = at;
                }
                Ok(t.clone())
            }
            slot => Ok(slot.insert((Tensor::new(&[value], device)?, at)).0.clone()),
        }
    }

    /// What a step's forward pass does to the host's record of the cache, for a step that ran
    /// without it (a CUDA graph's replay): one more position in every layer that holds keys.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn stepped(&mut self) {
        for c in self.kvs.iter_mut().flatten() {
            c.len += 1;
        }
        self.seq_len += 1;
    }

    /// Positions each layer has room for (0 where it holds nothing).
    pub fn kv_positions(&self) -> Vec<usize> {
        self.kvs.iter().map(|kv| kv.as_ref().map_or(0, |c| c.k.dims()[2])).collect()
    }

    /// Row `index[i]` of every layer's keys and values as row `i` (`index`: u32 on the cache's
    /// device): rows that share a prompt get copies of the one row that ran it.
    pub fn select_rows(&mut self, index: &Tensor) -> Result<()> {
        for c in self.kvs.iter_mut().flatten() {
            c.k = c.k.index_select(index, 0)?;
            c.v = c.v.index_select(index, 0)?;
        }
        Ok(())
    }

    /// Row `row`'s keys and values of each layer, `[1, kv_heads, kept, head_dim]`: copies of
    /// the filled positions (all of the sequence, or a sliding-window layer's last ones),
    /// sharing nothing with this cache.
    pub(crate) fn row_copy(&self, row: usize) -> Result<Vec<Option<(Tensor, Tensor)>>> {
        let copy = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, row, 1)?.force_contiguous()?) };
        self.kvs
            .iter()
            .map(|kv| {
                kv.as_ref()
                    .map(|c| -> Result<_> {
                        let (k, v) = c.view()?;
                        Ok((copy(&k)?, copy(&v)?))
                    })
                    .transpose()
            })
            .collect()
    }

    /// A cache of `seq_len` positions whose row `i` is `rows[i]` (each as [`Cache::row_copy`]
    /// gives it), in new buffers.
    pub(crate) fn from_rows(cfg: &Config, cancel: Cancel, rows: &[&[Option<(Tensor, Tensor)>]], seq_len: usize) -> Result<Self> {
        let mut cache = Self::with_cancel(cfg, cancel);
        for (l, kv) in cache.kvs.iter_mut().enumerate() {
            let parts: Option<Vec<_>> = rows.iter().map(|r| r.get(l).and_then(|x| x.as_ref())).collect();
            if let Some(parts) = parts {
                let ks: Vec<&Tensor> = parts.iter().map(|(k, _)| k).collect();
                let vs: Vec<&Tensor> = parts.iter().map(|(_, v)| v).collect();
                let (k, v) = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
                *kv = Some(LayerKv { len: k.dim(2)?, k, v });
            }
        }
        cache.seq_len = seq_len;
        Ok(cache)
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
    pub(crate) fn touches(&self, layer: usize) -> bool {
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
pub(crate) struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(src: &dyn WeightSource, key: Key, cfg: &Config) -> Result<Self> {
        let weight = src.vector(key)?;
        check_shape(src, key, weight.dims(), cfg)?;
        Ok(Self { weight, eps: cfg.rms_eps })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)?)
    }
}

/// Set clamped neurons of `hidden` (`[b, t, d_ff]`) to their values for the rows that ask for it.
pub(crate) fn apply_clamps(hidden: &Tensor, layer: usize, rows: &[Intervention], batch: usize) -> Result<Tensor> {
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

pub(crate) fn causal_mask(t: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    window_mask(t, offset, None, dtype, device)
}

/// The causal mask, `[t, offset + t]`; with a `window`, query `i` also sees only keys `j` with
/// `i - j < window` (Hugging Face's and llama.cpp's sliding window).
pub(crate) fn window_mask(t: usize, offset: usize, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let hidden = |i: usize, j: usize| j > i + offset || window.is_some_and(|w| i + offset >= j + w);
    let mask: Vec<f32> = (0..t).flat_map(|i| (0..total).map(move |j| if hidden(i, j) { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?)
}

/// Most rows [`few_rows_forward`] takes: a decoding step of several requests.
const FEW_ROWS: usize = 8;

/// Is `x · wᵀ` a product [`few_rows_forward`] does: both f32 on the CPU, `w` contiguous, at
/// most [`FEW_ROWS`] rows of `x`?
fn few_f32_rows(x: &Tensor, w: &Tensor) -> bool {
    let n_in = x.dims().last().copied().unwrap_or(0);
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous()
        && w.rank() == 2
        && n_in > 0
        && x.elem_count() / n_in <= FEW_ROWS
}

/// `x · wᵀ` for a few rows of `x` `[..., in]` and an f32 weight `w` `[out, in]` on the CPU,
/// reading each row of `w` once for all rows of `x`: decoding is bound by reading the weights,
/// and candle's CPU gemm packs the whole weight for any two rows or more (measured on a
/// `[128256, 2048]` head: 0.10 s for one row, 0.24 s for two to eight). Each output is one
/// dot product summed the same way whatever the number of rows (up to [`FEW_ROWS`]), so a
/// decoding step's numbers do not depend on what it is batched with.
fn few_rows_forward(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n_out, n_in) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    if dims.pop() != Some(n_in) {
        return Err(Error::bad(format!("x {:?} against a weight of {n_in} inputs", x.dims())));
    }
    let rows = x.elem_count() / n_in;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        return Err(Error::bad("few_rows_forward takes an f32 weight on the CPU"));
    };
    let w = &data[layout.start_offset()..layout.start_offset() + n_out * n_in];
    // Output by weight row ([out, rows]), in chunks of weight rows per task.
    const CHUNK: usize = 64;
    let mut by_row = vec![0f32; n_out * rows];
    by_row.par_chunks_mut(CHUNK * rows).enumerate().for_each(|(c, out)| {
        let w = &w[c * CHUNK * n_in..(c * CHUNK * n_in + out.len() / rows * n_in)];
        dots(&xs, w, n_in, out);
    });
    let mut out = vec![0f32; n_out * rows];
    for (j, v) in by_row.chunks_exact(rows).enumerate() {
        for (r, &x) in v.iter().enumerate() {
            out[r * n_out + j] = x;
        }
    }
    dims.push(n_out);
    Ok(Tensor::from_vec(out, dims, x.device())?)
}

/// `out[j * rows + r] = x_r · w_j` for the rows `x_r` of `xs` and `w_j` of `w` (`n_in` each).
fn dots(xs: &[f32], w: &[f32], n_in: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { dots_avx512(xs, w, n_in, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { dots_avx2(xs, w, n_in, out) };
        }
    }
    dots_any(xs, w, n_in, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(xs: &[f32], w: &[f32], n_in: usize, out: &mut [f32]) {
    dots_any(xs, w, n_in, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(xs: &[f32], w: &[f32], n_in: usize, out: &mut [f32]) {
    dots_any(xs, w, n_in, out)
}

/// [`dots`] in plain Rust, written so that the compiler vectorizes it (16 independent sums,
/// added up in a fixed order at the end) for whatever CPU features the caller enables.
#[inline(always)]
fn dots_any(xs: &[f32], w: &[f32], n_in: usize, out: &mut [f32]) {
    let rows = xs.len() / n_in;
    for (j, wj) in w.chunks_exact(n_in).enumerate() {
        for r in 0..rows {
            let x = &xs[r * n_in..(r + 1) * n_in];
            let mut acc = [0f32; 16];
            let (xc, xt) = x.as_chunks::<16>();
            let (wc, wt) = wj.as_chunks::<16>();
            for (a, b) in xc.iter().zip(wc) {
                for l in 0..16 {
                    acc[l] += a[l] * b[l];
                }
            }
            let mut s = acc.iter().sum::<f32>();
            for (a, b) in xt.iter().zip(wt) {
                s += a * b;
            }
            out[j * rows + r] = s;
        }
    }
}

/// Bytes of f32 copy a bf16 or f16 weight is converted in at a time by [`Linear::forward_f32`].
const F32_CHUNK_BYTES: usize = 64 << 20;

/// `f` of each chunk of rows of `w` (`[out, in]`, not f32) converted to f32, in order: as many
/// rows at a time as `chunk_bytes` of f32 hold (at least one).
fn f32_chunks(w: &Tensor, chunk_bytes: usize, mut f: impl FnMut(Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
    let (out, n_in) = w.dims2()?;
    let rows = (chunk_bytes / (4 * n_in.max(1))).max(1);
    (0..out).step_by(rows).map(|at| f(w.narrow(0, at, rows.min(out - at))?.to_dtype(DType::F32)?)).collect()
}

/// A linear layer's weight `[out, in]` as it is held: a candle `QMatMul` (a dense tensor, or
/// quantized blocks multiplied with 8-bit activations as llama.cpp does), or the file's blocks
/// multiplied exactly with f32 activations ([`ExactLinear`], CPU only).
#[derive(Debug, Clone)]
pub enum Linear {
    Candle(QMatMul),
    Exact(Arc<ExactLinear>),
}

impl Linear {
    /// `x · Wᵀ` for `x` `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(QMatMul::Tensor(w)) if few_f32_rows(x, w) => few_rows_forward(x, w),
            // All rows in one product, as candle_nn's Linear does: QMatMul multiplies a 3-D
            // `x` as a batch of products (one per row of a decoding step of several requests),
            // each reading the whole weight again.
            Linear::Candle(w @ (QMatMul::Tensor(_) | QMatMul::TensorF16(_))) if x.rank() > 2 && x.is_contiguous() => {
                let mut dims = x.dims().to_vec();
                let n_in = dims.pop().unwrap_or(1);
                let y = w.forward(&x.reshape((x.elem_count() / n_in.max(1), n_in))?)?;
                dims.push(y.dim(1)?);
                Ok(y.reshape(dims)?)
            }
            Linear::Candle(w) => Ok(w.forward(x)?),
            Linear::Exact(w) => w.forward(x),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims().to_vec(),
            Linear::Exact(w) => vec![w.dims().0, w.dims().1],
        }
    }

    /// The weight as a dense tensor (quantized weights dequantized to f32).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.clone(),
            Linear::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Linear::Exact(w) => w.dequantize()?,
        })
    }

    /// Rows `ids` of the weight, `[ids.len(), in]`: `dense()`'s rows, but of quantized blocks
    /// held exact only those rows are dequantized.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(match self {
            Linear::Exact(w) => w.rows_f32(ids)?,
            other => {
                let w = other.dense()?;
                w.index_select(&Tensor::new(ids, w.device())?, 0)?
            }
        })
    }

    /// Row `i` of the weight, `[in]` (see [`Linear::rows`]).
    pub fn row(&self, i: usize) -> Result<Tensor> {
        Ok(self.rows(&[i as u32])?.squeeze(0)?)
    }

    /// Column `j` of the weight, `[out]`: `dense().i((.., j))`, but of quantized blocks held
    /// exact only the block of each row that holds column `j` is dequantized.
    pub fn column(&self, j: usize) -> Result<Tensor> {
        use candle_core::IndexOp;
        Ok(match self {
            Linear::Exact(w) => w.column_f32(j)?,
            other => other.dense()?.i((.., j))?,
        })
    }

    /// `x · Wᵀ` in f32 for a few rows `x` `[n, in]`, `[n, out]`: quantized blocks held exact
    /// multiply in place (no dense copy of the weight); a bf16 or f16 weight is converted to f32
    /// a chunk of rows at a time (at most [`F32_CHUNK_BYTES`] of copy, not the whole weight:
    /// 2.1 GB for Llama 3.1 8B's head, on every neuron page); any other weight as `dense()` in
    /// f32. The same numbers every way, up to summation order.
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_f32_in(x, F32_CHUNK_BYTES)
    }

    fn forward_f32_in(&self, x: &Tensor, chunk_bytes: usize) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        Ok(match self {
            Linear::Exact(w) => w.forward(&x)?,
            Linear::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) if w.dtype() != DType::F32 => {
                let parts = f32_chunks(w, chunk_bytes, |c| Ok(x.matmul(&c.t()?)?))?;
                Tensor::cat(&parts, 1)?
            }
            other => x.matmul(&other.dense()?.to_dtype(DType::F32)?.t()?)?,
        })
    }

    /// `x · W` in f32 for a few rows `x` `[n, out]`, `[n, in]` (see [`Linear::forward_f32`]).
    pub fn forward_t_f32(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t_f32_in(x, F32_CHUNK_BYTES)
    }

    fn forward_t_f32_in(&self, x: &Tensor, chunk_bytes: usize) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        Ok(match self {
            Linear::Exact(w) => w.forward_t(&x)?,
            Linear::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) if w.dtype() != DType::F32 => {
                let mut at = 0;
                let parts = f32_chunks(w, chunk_bytes, |c| {
                    let rows = c.dim(0)?;
                    at += rows;
                    // Contiguous: cuBLAS takes no row stride wider than the row.
                    Ok(x.narrow(1, at - rows, rows)?.contiguous()?.matmul(&c)?)
                })?;
                parts
                    .into_iter()
                    .try_fold(None::<Tensor>, |sum, p| -> Result<_> {
                        Ok(Some(match sum {
                            Some(s) => (s + p)?,
                            None => p,
                        }))
                    })?
                    .ok_or_else(|| Error::bad("an empty weight"))?
            }
            other => x.matmul(&other.dense()?.to_dtype(DType::F32)?)?,
        })
    }

    /// Bytes the weight takes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
            Linear::Exact(w) => w.storage_bytes(),
        }
    }
}

/// A linear layer's weight, checked against the shape the configuration implies.
pub(crate) fn linear(src: &dyn WeightSource, key: Key, cfg: &Config) -> Result<Linear> {
    let w = src.linear(key)?;
    check_shape(src, key, &w.dims(), cfg)?;
    Ok(w)
}

/// A weight whose shape is not what the model's settings say is a corrupt or foreign file: refused
/// (otherwise clamps or maps would index past the real activations).
pub(crate) fn check_shape(src: &dyn WeightSource, key: Key, dims: &[usize], cfg: &Config) -> Result<()> {
    let want = key.shape(cfg);
    if dims != want.as_slice() {
        return Err(Error::model(src.origin(), format!("tensor {} has shape {dims:?}, but the model's settings say {want:?}", src.name(key))));
    }
    Ok(())
}

/// Whether every value of `t` is finite: `x - x` is 0 for finite x and NaN for NaN or ±inf, so
/// one sum tells, and only one scalar leaves the device.
/// A large tensor is checked in slices of 16M values, so the check needs 64 MB, not a copy of it.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    const SLICE: usize = 1 << 24;
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut at = 0;
    while at < n {
        let part = flat.narrow(0, at, SLICE.min(n - at))?.to_dtype(DType::F32)?;
        if part.sub(&part)?.sum_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(false);
        }
        at += SLICE;
    }
    Ok(true)
}

/// Softmax over the last dimension, in f32.
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?)
}

/// The checks every family's forward makes before it runs: a non-empty input, interventions that
/// fit the batch and the model, and room in the context. Returns `(rows in input, tokens, rows
/// out, offset)`.
pub(crate) fn check_forward(cfg: &Config, input: &Tensor, cache: &Cache, rows: &[Intervention]) -> Result<(usize, usize, usize, usize)> {
    let (b_in, t) = input.dims2()?;
    if t == 0 {
        return Err(Error::bad("empty input: at least one token is needed"));
    }
    if rows.len() > 1 && b_in != 1 && b_in != rows.len() {
        return Err(Error::bad(format!("{} interventions for a batch of {b_in}", rows.len())));
    }
    for iv in rows {
        validate(cfg, iv)?;
    }
    let offset = cache.seq_len;
    check_kept(cache)?;
    check_context(cfg, offset, t)?;
    Ok((b_in, t, rows.len().max(1), offset))
}

/// A [`Room::Scratch`] cache kept no keys: after its one pass, it has nothing to continue from.
fn check_kept(cache: &Cache) -> Result<()> {
    if cache.room == Room::Scratch && cache.seq_len > 0 {
        return Err(candle_core::Error::Msg("a scratch cache runs one forward pass: it kept no keys to continue from".into()).into());
    }
    Ok(())
}

/// Room in the model's context for `t` more tokens after `offset`.
fn check_context(cfg: &Config, offset: usize, t: usize) -> Result<()> {
    if offset + t > cfg.max_seq_len {
        return Err(Error::TooLarge(format!("{} tokens exceed the model's context of {} tokens", offset + t, cfg.max_seq_len)));
    }
    Ok(())
}

/// Check an intervention against the model's shape.
pub fn validate(cfg: &Config, iv: &Intervention) -> Result<()> {
    for c in &iv.clamps {
        crate::limits::check_clamp(c.layer, c.neuron, c.value, cfg)?;
    }
    Ok(())
}

/// One layer's MLP as a request runs it: the request's clamps at the input of down_proj, and the
/// activations recorded when asked.
pub(crate) struct MlpSite<'a> {
    layer: usize,
    rows: &'a [Intervention],
    batch: usize,
    record: bool,
    acts: &'a mut Vec<(usize, Tensor)>,
}

impl MlpSite<'_> {
    pub(crate) fn forward(&mut self, mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
        self.down(mlp, &mlp.hidden(x)?)
    }

    /// The MLP's output from its activation `hidden` (`[b, t, d_ff]`), clamped and recorded here.
    pub(crate) fn down(&mut self, mlp: &Mlp, hidden: &Tensor) -> Result<Tensor> {
        let hidden = apply_clamps(hidden, self.layer, self.rows, self.batch)?;
        if self.record {
            self.acts.push((self.layer, hidden.to_dtype(DType::F32)?));
        }
        mlp.down.forward(&hidden)
    }
}

/// Where a group of batch rows stands: the RoPE rows (`cos`, `sin`) of its query positions, its
/// attention mask (none for one position that sees every key) and, on a sliding-window layer,
/// the window the mask was built with (see [`attend`]).
pub(crate) struct Pos {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) mask: Option<Tensor>,
    pub(crate) window: Option<usize>,
    /// For a fused decoding step: the whole RoPE tables and the step's position on the device
    /// ([`Cache::step_slot`]), which its kernels index themselves.
    pub(crate) step: Option<((Tensor, Tensor), Tensor)>,
}

impl Pos {
    /// Positions `offset..offset + t` of RoPE tables `(cos, sin)`, with `mask`.
    pub(crate) fn at((cos, sin): &(Tensor, Tensor), offset: usize, t: usize, mask: Option<Tensor>) -> Result<Self> {
        Ok(Self { cos: cos.narrow(0, offset, t)?, sin: sin.narrow(0, offset, t)?, mask, window: None, step: None })
    }

    /// The same for one decoding step, with what a fused step reads: the whole `tables` and the
    /// cache's step slot.
    pub(crate) fn step(tables: &(Tensor, Tensor), cache: &mut Cache, device: &Device) -> Result<Self> {
        let slot = cache.step_slot(device)?;
        Ok(Self { step: Some((tables.clone(), slot)), ..Self::at(tables, cache.seq_len, 1, None)? })
    }

    /// The same, on a layer whose queries see only the last `window` positions (`mask` must be
    /// that [`window_mask`] when there is one).
    pub(crate) fn windowed(tables: &(Tensor, Tensor), offset: usize, t: usize, mask: Option<Tensor>, window: usize) -> Result<Self> {
        Ok(Self { window: Some(window), ..Self::at(tables, offset, t, mask)? })
    }
}

/// Consecutive rows of a batch that share their positions and one layer's cache: one request's
/// rows. A plain forward pass is one segment; a step of several requests at once, one each.
pub(crate) struct Segment<'a> {
    pub(crate) rows: usize,
    /// Index of the group's [`Pos`].
    pub(crate) group: usize,
    pub(crate) kv: &'a mut Option<LayerKv>,
    pub(crate) room: Room,
}

/// Attention after the projections, segment by segment: each segment's queries and keys
/// (`[b, heads, t, head_dim]`) are rotated at its own positions (`rope(x, cos, sin)`), its keys
/// and values appended to its own cache, and its queries attend to that cache under its mask.
/// Returns `[b, heads, t, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segs: &mut [Segment],
    pos: &[Pos],
    rope: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    n_rep: usize,
    scale: f64,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let one = segs.len() == 1;
    let mut ys = Vec::with_capacity(segs.len());
    let mut at = 0;
    for s in segs.iter_mut() {
        let part = |x: &Tensor| -> Result<Tensor> { Ok(if one { x.clone() } else { x.narrow(0, at, s.rows)? }) };
        let p = &pos[s.group];
        let (q, k) = (rope(&part(q)?, &p.cos, &p.sin)?, rope(&part(k)?, &p.cos, &p.sin)?);
        let (k, v) = append_kv(s.kv, k, part(v)?, s.room, p.window)?;
        ys.push(attend(&q, &k, &v, n_rep, scale, softcap, p.mask.as_ref(), p.window)?);
        at += s.rows;
    }
    Ok(if one { ys.pop().expect("one segment") } else { Tensor::cat(&ys, 0)? })
}

/// One decoding step of a group of rows that share a cache: one token per row, the cache already
/// holding every row (a request after its prompt), one intervention per row or one for all.
pub struct StepGroup<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut Cache,
    pub rows: &'a [Intervention],
}

/// The checks a step of several groups makes before it runs (see [`check_forward`]). Returns the
/// input `[rows, 1]` and one intervention per row.
pub(crate) fn check_step(cfg: &Config, groups: &[StepGroup], device: &Device) -> Result<(Tensor, Vec<Intervention>)> {
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    for g in groups {
        let n = g.tokens.len();
        let held = g.cache.kvs.first().and_then(|kv| kv.as_ref()).map(|kv| kv.k.dim(0)).transpose()?;
        if held != Some(n) {
            return Err(Error::bad(format!("a step group feeds {n} rows to a cache holding {held:?}")));
        }
        if g.rows.len() != 1 && g.rows.len() != n {
            return Err(Error::bad(format!("{} interventions for a group of {n} rows", g.rows.len())));
        }
        check_kept(g.cache)?;
        check_context(cfg, g.cache.seq_len, 1)?;
        for iv in g.rows {
            validate(cfg, iv)?;
        }
        tokens.extend_from_slice(g.tokens);
        rows.extend((0..n).map(|r| g.rows[if g.rows.len() == 1 { 0 } else { r }].clone()));
    }
    if tokens.is_empty() {
        return Err(Error::bad("a step needs at least one row"));
    }
    let n = tokens.len();
    Ok((Tensor::from_vec(tokens, (n, 1), device)?, rows))
}

/// The layer loop of a step of several groups (`x`: `[rows, 1, d]`, the groups' rows in order):
/// `layer(l, x, segments, mlp)` runs one block with a segment per group. Each group's cache
/// grows by one position. Cancellation is the caller's: it is checked between steps.
pub(crate) fn run_step_layers(
    mut x: Tensor,
    groups: &mut [StepGroup],
    rows: &[Intervention],
    mut layer: impl FnMut(usize, Tensor, &mut [Segment], &mut MlpSite) -> Result<Tensor>,
) -> Result<Tensor> {
    let n_layers = groups.first().map_or(0, |g| g.cache.kvs.len());
    let batch = rows.len();
    let mut acts = Vec::new();
    for l in 0..n_layers {
        let mut segs: Vec<Segment> = groups
            .iter_mut()
            .enumerate()
            .map(|(group, g)| Segment { rows: g.tokens.len(), group, kv: &mut g.cache.kvs[l], room: g.cache.room })
            .collect();
        let mut site = MlpSite { layer: l, rows, batch, record: false, acts: &mut acts };
        x = layer(l, x, &mut segs, &mut site)?;
    }
    for g in groups.iter_mut() {
        g.cache.seq_len += 1;
    }
    Ok(x)
}

/// The layer loop every family shares: before each layer it checks for cancellation and, when
/// one row (`x`: `[1, t, d]`) must become `n_rows` that differ from this layer on, repeats the
/// stream and the caches below; `layer(l, x, segments, mlp)` runs one block (one segment: the
/// whole batch). Returns the final stream (`n_rows` rows) and the recorded MLP activations.
pub(crate) fn run_layers(
    mut x: Tensor,
    cache: &mut Cache,
    rows: &[Intervention],
    record: &[usize],
    n_rows: usize,
    mut layer: impl FnMut(usize, Tensor, &mut [Segment], &mut MlpSite) -> Result<Tensor>,
) -> Result<(Tensor, Vec<(usize, Tensor)>)> {
    let (mut batch, t, _) = x.dims3()?;
    let n_layers = cache.kvs.len();
    let mut acts = Vec::new();
    for l in 0..n_layers {
        cache.cancel.check()?;
        if batch == 1 && n_rows > 1 && rows.iter().any(|iv| iv.touches(l)) {
            x = expand(&x, cache, l, n_rows)?;
            batch = n_rows;
        }
        let mut site = MlpSite { layer: l, rows, batch, record: record.contains(&l), acts: &mut acts };
        let mut segs = [Segment { rows: batch, group: 0, kv: &mut cache.kvs[l], room: cache.room }];
        x = layer(l, x, &mut segs, &mut site)?;
    }
    if batch == 1 && n_rows > 1 {
        x = expand(&x, cache, n_layers, n_rows)?;
    }
    cache.seq_len += t;
    Ok((x, acts))
}

/// Repeat the residual stream and the caches of layers `< upto` from one row to `n` rows.
pub(crate) fn expand(x: &Tensor, cache: &mut Cache, upto: usize, n: usize) -> Result<Tensor> {
    for kv in cache.kvs.iter_mut().take(upto) {
        if let Some(c) = kv.take() {
            *kv = Some(c.repeat(n)?);
        }
    }
    Ok(x.repeat((n, 1, 1))?)
}

pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// RoPE tables `(cos, sin)`, `[max_seq_len, head_dim / 2]`, for inverse frequencies `inv`.
pub(crate) fn rope_tables(inv: Vec<f32>, max_seq_len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv.len();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, max_seq_len as u32, device)?.to_dtype(DType::F32)?.reshape((max_seq_len, 1))?;
    let angles = pos.broadcast_mul(&inv)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
}

/// Scaled dot-product attention over `[b, heads, t, head_dim]` queries and the cached keys and
/// values (`[b, kv_heads, total, head_dim]`, repeated to the query heads), with an additive mask;
/// scores soft-capped (`cap · tanh(s / cap)`) first when asked (Gemma 2). A few query positions
/// (decoding) in f32 on the CPU take the fused kernel of [`super::attention`].
///
/// Grouped-query attention without copying the keys and values: the `n_rep` query heads that
/// share a key/value head are stacked as rows of one matrix (`[b, kv_heads, n_rep * t, d]`), so
/// `k` and `v` (`[b, kv_heads, len, d]`, possibly views of a longer cache) are read in place.
///
/// The mask is causal (a [`window_mask`]: query `i` sees no key after position `len - t + i`),
/// so a long prompt's queries run in blocks of [`QUERY_BLOCK`], each against only the keys it
/// can see: half the products of the whole square, and scores the size of a block rather than
/// `t × len` (a 2,048-token prompt's scores were 150 MB per layer for SmolLM2's 9 heads). On a
/// sliding-window layer (`window`: the one `mask` was built with; `None` for a global layer),
/// keys that have left the window of every query of a block are not read either: a decoding
/// step after a long prompt reads the last `window` keys, not all of them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_rep: usize,
    scale: f64,
    softcap: Option<f32>,
    mask: Option<&Tensor>,
    window: Option<usize>,
) -> Result<Tensor> {
    let (t, len) = (q.dim(2)?, k.dim(2)?);
    // Blocks and windows read only some of the mask's columns: a mask of any other shape than
    // the one the whole square would add to is refused, not narrowed. A windowed layer's cache
    // may have dropped positions no query here sees: the mask's first `dropped` columns.
    let mut dropped = 0;
    if let Some(m) = mask {
        let (rows, cols) = m.dims2()?;
        if rows != t || cols < len || (cols > len && window.is_none()) {
            return Err(candle_core::Error::Msg(format!("attention mask {:?} for {t} queries and {len} keys", m.dims())).into());
        }
        dropped = cols - len;
    }
    if mask.is_none() && t > 1 {
        // Every query sees every key.
        return attend_block(q, k, v, n_rep, scale, softcap, None);
    }
    let offset = len.checked_sub(t).ok_or_else(|| candle_core::Error::Msg(format!("{t} queries for {len} keys")))?;
    // Queries `a..a + n` against the keys they can see.
    let queries = |a: usize, n: usize| -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        let (lo, hi) = seen_keys(offset, a, n, window);
        // One query sees every key left: those before it, and in its window.
        let mask = match mask {
            Some(m) if n > 1 => Some(m.narrow(0, a, n)?.narrow(1, dropped + lo, hi - lo)?),
            _ => None,
        };
        Ok((q.narrow(2, a, n)?, k.narrow(2, lo, hi - lo)?, v.narrow(2, lo, hi - lo)?, mask))
    };
    if !in_blocks(t) {
        let (q, k, v, mask) = queries(0, t)?;
        if let Some(y) = super::attention::attend(&q, &k, &v, n_rep, scale, softcap, mask.as_ref())? {
            return Ok(y);
        }
        return attend_block(&q, &k, &v, n_rep, scale, softcap, mask.as_ref());
    }
    let mut ys = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    for (a, n) in query_blocks(t) {
        let (q, k, v, mask) = queries(a, n)?;
        ys.push(attend_block(&q, &k, &v, n_rep, scale, softcap, mask.as_ref())?);
    }
    Ok(Tensor::cat(&ys, 2)?)
}

/// The queries `a..a + n` that [`attend`] runs together for a prompt of `t`: all of them, or
/// blocks of [`QUERY_BLOCK`] for a long one.
fn query_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    let step = if in_blocks(t) { QUERY_BLOCK } else { t.max(1) };
    (0..t).step_by(step).map(move |a| (a, step.min(t - a)))
}

/// The keys `lo..hi` that queries `a..a + n` after `past` cached positions read: none after the
/// last one's position, none that left a sliding `window` before the first one's (the query at
/// position `p` sees the keys `j` with `p - window < j <= p`).
fn seen_keys(past: usize, a: usize, n: usize, window: Option<usize>) -> (usize, usize) {
    (window.map_or(0, |w| (past + a + 1).saturating_sub(w)), past + a + n)
}

/// Query positions per block of a long prompt's attention (see [`attend`]).
pub const QUERY_BLOCK: usize = 128;

/// Whether [`attend`] runs `t` query positions (under a mask: every `t > 1` has one) in blocks.
fn in_blocks(t: usize) -> bool {
    t > 2 * QUERY_BLOCK
}

/// Query positions whose scores [`attend`] holds at once for a prompt of `t`.
pub(crate) fn score_rows(t: usize) -> usize {
    if in_blocks(t) {
        QUERY_BLOCK
    } else {
        t
    }
}

/// Query × key pairs that [`attend`] scores for `t` new positions after `past` cached ones, on a
/// layer with a sliding `window` or none: every query against every key, but a long prompt's
/// blocks stop at their own last position, and a window's blocks and steps start at the first
/// key their first query sees.
pub fn attention_pairs(t: usize, past: usize, window: Option<usize>) -> usize {
    query_blocks(t)
        .map(|(a, n)| {
            let (lo, hi) = seen_keys(past, a, n, window);
            n * (hi - lo)
        })
        .sum()
}

/// [`attend`]'s arithmetic for queries that all see all of `k` but what `mask` hides.
fn attend_block(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize, scale: f64, softcap: Option<f32>, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kv_heads, len) = (h / n_rep, k.dim(2)?);
    let q = q.contiguous()?.reshape((b, kv_heads, n_rep * t, d))?;
    let att = (q.matmul(&k.t()?)? * scale)?;
    let att = match softcap {
        Some(cap) => ((att / cap as f64)?.tanh()? * cap as f64)?,
        None => att,
    };
    let att = match mask {
        Some(m) => att.reshape((b, kv_heads, n_rep, t, len))?.broadcast_add(m)?.reshape((b, kv_heads, n_rep * t, len))?,
        None => att,
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    Ok(att.matmul(v)?.reshape((b, h, t, d))?)
}

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]`, of which the first
/// `len` positions are filled: appending writes in place. The buffer is allocated as its
/// cache's [`Room`] says: a generation's once, for its prompt and longest answer; a growing
/// one's doubles when full, so it is copied O(log n) times instead of at every token.
///
/// A sliding-window layer keeps only the positions a later query can still see, the last
/// `window - 1`, in a buffer of [`WINDOW_SLACK`] more: when it is full, the kept positions move
/// to its front (no new allocation). Its `len` is then fewer than the cache's `seq_len`: its
/// positions are the last `len` of the sequence.
#[derive(Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) len: usize,
}

impl LayerKv {
    fn view(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }

    /// The same positions in `n` rows (all rows must be the one row's copies), in buffers of the
    /// same capacity: what its room asked for stays asked for (a generation's next steps write
    /// in place instead of reallocating every layer at the first).
    fn repeat(&self, n: usize) -> Result<LayerKv> {
        Ok(LayerKv { k: self.k.repeat((n, 1, 1, 1))?, v: self.v.repeat((n, 1, 1, 1))?, len: self.len })
    }
}

/// Positions a sliding-window layer's cache holds beyond the `window - 1` it keeps: how often
/// (in decoding steps) its kept positions move to the front of its buffer.
pub const WINDOW_SLACK: usize = QUERY_BLOCK;

/// Append this step's keys and values to a layer's cache, making room as `room` says; returns
/// the keys and values this step's queries attend to (views where it can): the kept ones, then
/// this step's. A [`Room::Scratch`] cache keeps nothing: this step's are all. On a layer with a
/// sliding `window`, the cache keeps only what later queries can see (see [`LayerKv`]), so the
/// kept ones may be fewer than the sequence's, but never fewer than the `window - 1` the
/// step's first query sees.
pub(crate) fn append_kv(kv: &mut Option<LayerKv>, k: Tensor, v: Tensor, room: Room, window: Option<usize>) -> Result<(Tensor, Tensor)> {
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let t = k.dim(2)?;
    if room == Room::Scratch {
        return Ok((k, v));
    }
    // The positions a later query can see, on a windowed layer.
    let keep = window.map(|w| w.max(1) - 1);
    if let (Some(keep), Some(c)) = (keep, kv.as_mut()) {
        if c.len + t > c.k.dim(2)? && c.len > keep {
            // Full: the kept positions move to the front, through a copy (source and
            // destination share the buffer; a one-row one-head narrow is already contiguous).
            let (tk, tv) = (c.k.narrow(2, c.len - keep, keep)?.force_contiguous()?, c.v.narrow(2, c.len - keep, keep)?.force_contiguous()?);
            c.k.slice_set(&tk, 2, 0)?;
            c.v.slice_set(&tv, 2, 0)?;
            c.len = keep;
        }
    }
    let (b, h, _, d) = k.dims4()?;
    let len = kv.as_ref().map_or(0, |c| c.len);
    if let Some(c) = make_room(kv, (b, h, d), t, room, keep, k.dtype(), k.device())? {
        c.k.slice_set(&k, 2, c.len)?;
        c.v.slice_set(&v, 2, c.len)?;
        c.len += t;
        return c.view();
    }
    // A windowed layer given more positions than its buffer holds (a long prompt): the step
    // attends to the kept ones and all of its own, and the buffer keeps the last `keep`.
    let keep = keep.expect("only a windowed layer's buffer is smaller than a step");
    let cap = capacity(room, len, t, Some(keep));
    let (nk, nv) = (Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?, Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?);
    let (all_k, all_v) = match kv.as_ref() {
        Some(c) if c.len > 0 => {
            let (pk, pv) = c.view()?;
            (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
        }
        _ => (k, v),
    };
    if keep > 0 {
        let n = all_k.dim(2)?;
        nk.slice_set(&all_k.narrow(2, n - keep, keep)?.contiguous()?, 2, 0)?;
        nv.slice_set(&all_v.narrow(2, n - keep, keep)?.contiguous()?, 2, 0)?;
    }
    *kv = Some(LayerKv { k: nk, v: nv, len: keep });
    Ok((all_k, all_v))
}

/// Positions a layer's new buffer holds for `len` kept and `t` new ones (see [`LayerKv`]).
fn capacity(room: Room, len: usize, t: usize, keep: Option<usize>) -> usize {
    let cap = match room {
        Room::Positions(n) if n >= len + t => n,
        _ => (2 * (len + t)).max(32),
    };
    keep.map_or(cap, |keep| cap.min(keep + WINDOW_SLACK))
}

/// A layer's cache with room for `t` more positions written in place ([`append_kv`] without
/// the writing): as it is when they fit, else moved to a larger buffer as `room` says (on a
/// layer keeping `keep` positions of a sliding window, at most `keep` + [`WINDOW_SLACK`]).
/// `None`: a windowed layer's buffer cannot hold them. `shape`: the cache's
/// `(rows, kv_heads, head_dim)`.
pub(crate) fn make_room<'a>(
    kv: &'a mut Option<LayerKv>,
    shape: (usize, usize, usize),
    t: usize,
    room: Room,
    keep: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Option<&'a mut LayerKv>> {
    let (b, h, d) = shape;
    let len = match kv.as_ref() {
        Some(c) if (c.k.dim(0)?, c.k.dim(1)?, c.k.dim(3)?) != shape => {
            return Err(Error::bad(format!("a cache of {:?} for rows of {shape:?}", c.k.dims())));
        }
        Some(c) if c.len + t <= c.k.dim(2)? => return Ok(kv.as_mut()),
        Some(c) => c.len,
        None => 0,
    };
    let cap = capacity(room, len, t, keep);
    if len + t > cap {
        return Ok(None);
    }
    let (nk, nv) = (Tensor::zeros((b, h, cap, d), dtype, device)?, Tensor::zeros((b, h, cap, d), dtype, device)?);
    if let Some(c) = kv.as_ref() {
        let (pk, pv) = c.view()?;
        nk.slice_set(&pk.contiguous()?, 2, 0)?;
        nv.slice_set(&pv.contiguous()?, 2, 0)?;
    }
    Ok(Some(kv.insert(LayerKv { k: nk, v: nv, len })))
}

/// RoPE of `x` (`[b, heads, t, head_dim]`) at the tables' rows `cos`, `sin`: on pairs
/// `(2i, 2i + 1)` when `interleaved` (GGUF's Llama layout), else on halves.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(if interleaved { candle_nn::rotary_emb::rope_i(&x, cos, sin)? } else { candle_nn::rotary_emb::rope(&x, cos, sin)? })
}

/// The token embedding as held: dense, or a quantized file's blocks kept exact.
#[derive(Debug)]
pub(crate) enum Embedding {
    Dense(Tensor),
    Rows(Arc<ExactLinear>),
}

/// What every family's model holds besides its blocks, loaded the same way for each: the
/// settings, the token embedding, the final norm and the LM head (tied or not), on one device in
/// one dtype.
#[derive(Debug)]
pub struct Shell {
    pub(crate) cfg: Config,
    /// Token embedding, `[vocab, d_model]`, in the compute dtype (unscaled).
    pub(crate) embed: Embedding,
    pub(crate) norm: RmsNorm,
    pub(crate) lm_head: Linear,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
}

impl Shell {
    pub(crate) fn load(src: &dyn WeightSource, cfg: &Config) -> Result<Self> {
        let device = src.device().clone();
        cfg.check().map_err(|e| Error::model(src.origin(), e))?;
        // Held exact, a quantized embedding stays in its blocks (rows dequantized as they are
        // looked up), and a tied head multiplies the same blocks.
        let embed = match src.mode() {
            WeightMode::Exact => match linear(src, Key::Embed, cfg)? {
                Linear::Exact(w) => Embedding::Rows(w),
                other => Embedding::Dense(other.dense()?),
            },
            _ => Embedding::Dense(src.dense(Key::Embed)?),
        };
        let norm = RmsNorm::load(src, Key::OutNorm, cfg)?;
        let (lm_head, dtype) = match &embed {
            Embedding::Dense(t) => {
                check_shape(src, Key::Embed, t.dims(), cfg)?;
                (if cfg.tied_embeddings { src.tied_head(t)? } else { linear(src, Key::Output, cfg)? }, t.dtype())
            }
            Embedding::Rows(w) => (if cfg.tied_embeddings { Linear::Exact(w.clone()) } else { linear(src, Key::Output, cfg)? }, DType::F32),
        };
        Ok(Self { cfg: cfg.clone(), embed, norm, lm_head, device, dtype })
    }

    /// The residual stream's start: the embeddings of `ids` (`[b, t]`), `[b, t, d_model]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let x = match &self.embed {
            Embedding::Dense(e) => e.embedding(&flat)?,
            Embedding::Rows(w) => w.rows_f32(&flat.to_vec1::<u32>()?)?.to_device(&self.device)?,
        };
        Ok(x.reshape((b, t, self.cfg.d_model))?)
    }

    /// Logits `[b, vocab]` (f32) of the last of the `t` positions of the residual stream `x`.
    pub(crate) fn logits(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let last = x.narrow(1, t - 1, 1)?;
        Ok(self.lm_head.forward(&self.norm.forward(&last)?)?.squeeze(1)?.to_dtype(DType::F32)?)
    }

    /// Bytes of the weights a forward pass reads here (the embedding is only indexed).
    pub(crate) fn bytes(&self) -> usize {
        self.lm_head.bytes() + tensor_bytes(&self.norm.weight)
    }
}

/// The gating nonlinearity of a gated MLP: Llama's SiLU, or Gemma's GELU with the tanh
/// approximation (PyTorch's `gelu(approximate="tanh")`, candle's `gelu`).
pub(crate) use crate::vmath::Act;

/// `f` of the elements of a contiguous f32 tensor on the CPU, read in place; `None` elsewhere.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Some(f(&v[start..end])),
        _ => None,
    }
}

/// The gated MLP: down(act(gate(x)) * up(x)). `hidden` is the neuron activation we read and clamp.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    act: Act,
}

impl Mlp {
    pub(crate) fn load(src: &dyn WeightSource, l: usize, cfg: &Config, act: Act) -> Result<Self> {
        Ok(Self { gate: linear(src, Key::Gate(l), cfg)?, up: linear(src, Key::Up(l), cfg)?, down: linear(src, Key::Down(l), cfg)?, act })
    }

    pub(crate) fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?);
        // On the CPU in f32 (every CPU path but explicit bf16/f16 weights): one vectorised pass
        // (`vmath::gated`) where candle's ops take libm's scalar exp or tanh per element and a
        // second pass for the product.
        if g.dims() == u.dims() {
            if let Some(h) = with_cpu_f32(&g, |gs| with_cpu_f32(&u, |us| crate::vmath::gated(gs, us, self.act))).flatten() {
                return Ok(Tensor::from_vec(h, g.shape(), g.device())?);
            }
        }
        let g = match self.act {
            Act::Silu => candle_nn::ops::silu(&g)?,
            Act::GeluTanh => g.gelu()?,
        };
        Ok((g * u)?)
    }

    pub(crate) fn bytes(&self) -> usize {
        [&self.gate, &self.up, &self.down].into_iter().map(Linear::bytes).sum()
    }
}

#[cfg(test)]
mod kv_tests {
    use super::*;

    #[test]
    fn the_growing_cache_holds_exactly_what_was_appended() {
        let dev = Device::Cpu;
        let mut kv = None;
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        // A 5-position prompt, then one position at a time past several doublings.
        for t in std::iter::once(5).chain(std::iter::repeat_n(1, 140)) {
            let (k, v) = (Tensor::randn(0f32, 1.0, (2, 3, t, 4), &dev).unwrap(), Tensor::randn(0f32, 1.0, (2, 3, t, 4), &dev).unwrap());
            ks.push(k.clone());
            vs.push(v.clone());
            let (gk, gv) = append_kv(&mut kv, k, v, Room::Grow, None).unwrap();
            let (wk, wv) = (Tensor::cat(&ks, 2).unwrap(), Tensor::cat(&vs, 2).unwrap());
            assert_eq!(gk.flatten_all().unwrap().to_vec1::<f32>().unwrap(), wk.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert_eq!(gv.flatten_all().unwrap().to_vec1::<f32>().unwrap(), wv.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let c = kv.unwrap();
        assert_eq!((c.len, c.k.dim(2).unwrap()), (145, 270), "32, then 66, 134, 270: four allocations for 145 positions");
        // Repeated to 3 rows for a batch, each row is the original's, with the same room.
        let r = c.repeat(3).unwrap();
        assert_eq!(r.view().unwrap().0.dims(), &[6, 3, 145, 4]);
        assert_eq!(r.k.dim(2).unwrap(), 270);
        for row in 0..3 {
            let (rk, ck) = (r.view().unwrap().0.narrow(0, 2 * row, 2).unwrap(), c.view().unwrap().0);
            assert_eq!(rk.flatten_all().unwrap().to_vec1::<f32>().unwrap(), ck.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }

    /// A sliding-window layer's cache keeps the last `window - 1` positions (or all, while there
    /// are fewer) in a buffer of `WINDOW_SLACK` more, whatever the room, and each append returns
    /// at least those and the step's own: the end of the whole sequence.
    #[test]
    fn a_windowed_cache_keeps_what_later_queries_see() {
        let dev = Device::Cpu;
        let w = 20;
        let keep = w - 1;
        // Two heads, and one (Gemma 3 270M's): one row's narrow of it is contiguous.
        for (room, heads) in [(Room::Grow, 2), (Room::Positions(700), 2), (Room::Positions(100), 2), (Room::Positions(60), 2), (Room::Grow, 1)] {
            let mut kv = None;
            let mut all = Vec::new();
            // A long prompt, steps past a few moves to the front, a short chunk, a long one.
            let steps = [300].into_iter().chain(std::iter::repeat_n(1, 2 * WINDOW_SLACK + 7)).chain([5, 200, 1]);
            for t in steps {
                let k = Tensor::randn(0f32, 1.0, (1, heads, t, 3), &dev).unwrap();
                all.push(k.clone());
                let (gk, gv) = append_kv(&mut kv, k.clone(), (&k * 2.0).unwrap(), room, Some(w)).unwrap();
                let whole = Tensor::cat(&all, 2).unwrap();
                let (n, got) = (whole.dim(2).unwrap(), gk.dim(2).unwrap());
                assert!(got >= (keep + t).min(n) && got <= n, "{room:?}: {got} of {n} positions after a step of {t}");
                let want = whole.narrow(2, n - got, got).unwrap();
                assert_eq!(gk.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                assert_eq!(
                    gv.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    (want * 2.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
                let c = kv.as_ref().unwrap();
                assert!(c.len >= keep.min(n) && c.k.dim(2).unwrap() <= keep + WINDOW_SLACK, "{room:?}: holds {} in {}", c.len, c.k.dim(2).unwrap());
            }
        }
    }

    #[test]
    fn grouped_attention_without_copies_equals_repeating_the_heads() {
        let dev = Device::Cpu;
        // More query positions than the fused kernel takes: this is the general path.
        let (b, h, kvh, t, len, d) = (2, 6, 2, super::super::attention::MAX_QUERIES + 1, 9, 4);
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        let (k, v) = (Tensor::randn(0f32, 1.0, (b, kvh, len, d), &dev).unwrap(), Tensor::randn(0f32, 1.0, (b, kvh, len, d), &dev).unwrap());
        let mask = window_mask(t, len - t, None, DType::F32, &dev).unwrap();
        let got = attend(&q, &k, &v, h / kvh, 0.5, Some(30.0), Some(&mask), None).unwrap();
        // The textbook form: every query head gets its own copy of its key/value head.
        let (kr, vr) = (
            candle_transformers::utils::repeat_kv(k, h / kvh).unwrap().contiguous().unwrap(),
            candle_transformers::utils::repeat_kv(v, h / kvh).unwrap().contiguous().unwrap(),
        );
        let att = (q.matmul(&kr.t().unwrap()).unwrap() * 0.5).unwrap();
        let att = ((att / 30.0).unwrap().tanh().unwrap() * 30.0).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&att).unwrap().matmul(&vr).unwrap();
        let diff: f32 = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    /// A long prompt's queries, block by block against the keys each block sees, give what the
    /// whole square gives: causal or windowed, the prompt alone or after a cache, a last block
    /// shorter than the others. So do a few queries (decoding: the fused kernel, one query with
    /// no mask as Gemma's local layers send it; or the general path) that read only the keys
    /// left in their window.
    #[test]
    fn long_prompts_attend_in_blocks_as_in_one_square() {
        let dev = Device::Cpu;
        let (b, h, kvh, d) = (2, 6, 2, 16);
        let few = super::super::attention::MAX_QUERIES;
        for (t, offset, window) in [
            (2 * QUERY_BLOCK + 37, 0, None),
            (2 * QUERY_BLOCK + 1, 11, None),
            (3 * QUERY_BLOCK, 5, Some(100)),
            (3 * QUERY_BLOCK + 5, 0, Some(150)),
            (1, 300, Some(100)),
            (few, 300, Some(100)),
            (few + 3, 300, Some(100)),
            (1, 60, Some(100)),
        ] {
            let len = offset + t;
            let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
            let cache = |_| Tensor::randn(0f32, 1.0, (b, kvh, len + 7, d), &dev).unwrap().narrow(2, 0, len).unwrap();
            let (k, v) = (cache(0), cache(1));
            let mask = window_mask(t, offset, window, DType::F32, &dev).unwrap();
            let got = attend(&q, &k, &v, h / kvh, 0.25, None, (t > 1).then_some(&mask), window).unwrap();
            let want = attend_block(&q, &k, &v, h / kvh, 0.25, None, Some(&mask)).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff: f32 = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert!(diff < 1e-5, "t {t}, offset {offset}, window {window:?}: {diff}");
        }
    }
}

#[cfg(test)]
mod linear_tests {
    use super::*;

    /// A bf16 weight converted a few rows at a time gives what converting it whole gives, in
    /// both directions, whether the chunks divide the rows or not.
    #[test]
    fn chunked_f32_products_equal_the_whole_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let lin = Linear::Candle(QMatMul::Tensor(w.clone()));
        let wf = w.to_dtype(DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 24), &dev).unwrap();
        let xt = Tensor::randn(0f32, 1.0, (3, 37), &dev).unwrap();
        let want = x.matmul(&wf.t().unwrap()).unwrap();
        let want_t = xt.matmul(&wf).unwrap();
        let max_diff =
            |a: &Tensor, b: &Tensor| -> f32 { (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap() };
        // 1 row, 5 rows (37 = 7 × 5 + 2), and all of them at once.
        for chunk in [4 * 24, 5 * 4 * 24, 1 << 20] {
            let got = lin.forward_f32_in(&x, chunk).unwrap();
            assert_eq!(got.dims(), &[3, 37]);
            assert!(max_diff(&got, &want) < 1e-5, "{chunk}");
            let got_t = lin.forward_t_f32_in(&xt, chunk).unwrap();
            assert_eq!(got_t.dims(), &[3, 24]);
            assert!(max_diff(&got_t, &want_t) < 1e-4, "{chunk}");
        }
    }
}

#[cfg(test)]
mod few_rows_tests {
    use super::*;

    /// The few-rows product equals candle's, for 1 to FEW_ROWS rows, 2-D and 3-D `x`, an input
    /// size that is not a multiple of 16 and more output rows than one task takes; and a row's
    /// numbers are the same alone as among others.
    #[test]
    fn few_rows_equal_candles_product_and_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (200, 37), &dev).unwrap();
        let lin = Linear::Candle(QMatMul::Tensor(w.clone()));
        let x = Tensor::randn(0f32, 1.0, (FEW_ROWS, 37), &dev).unwrap();
        let alone = lin.forward(&x.narrow(0, 2, 1).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for rows in 1..=FEW_ROWS {
            let xr = x.narrow(0, 0, rows).unwrap().contiguous().unwrap();
            let want = xr.matmul(&w.t().unwrap()).unwrap();
            for xin in [xr.clone(), xr.reshape((rows, 1, 37)).unwrap()] {
                assert!(few_f32_rows(&xin, &w));
                let got = lin.forward(&xin).unwrap();
                assert_eq!(got.dims()[..got.rank() - 1], xin.dims()[..xin.rank() - 1]);
                let got = got.reshape((rows, 200)).unwrap();
                let diff: f32 = (&got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(diff < 1e-4, "{rows} rows: {diff}");
                if rows > 2 {
                    assert_eq!(got.get(2).unwrap().to_vec1::<f32>().unwrap(), alone, "row 2 among {rows}");
                }
            }
        }
        assert!(!few_f32_rows(&Tensor::zeros((FEW_ROWS + 1, 37), DType::F32, &dev).unwrap(), &w));
    }
}
