//! The neuron map: every MLP neuron of every layer decoded through the LM head, in both
//! polarities, reduced to its top-k tokens, its logsumexp and the logsumexp of its top-100
//! logits (what concept search needs), and the moments of its logits over the vocabulary (what
//! the neuron classes need). Built once per model, view and options, and cached on disk.

pub mod cache;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kernel;
pub mod select;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use shared::{Polarity, Scale, View};

use crate::error::Result;
use crate::model::{Config, Key, LanguageModel, WeightSource};

/// Top tokens kept per neuron and polarity; the normalised probability uses the top 100.
pub const TOP_K: usize = 100;
pub const NORM_TOP: usize = 100;

/// What a map is of. Stored in the cache header; a cache for other options is not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMeta {
    /// Content fingerprint of the model file(s) (see [`cache::fingerprint`]).
    pub model_fingerprint: String,
    pub view: View,
    /// Directions multiplied by the final RMSNorm weight before decoding.
    pub final_norm: bool,
    pub k: usize,
    /// How the weights were held when the map was built ("f32", "bf16", "quantized", ...).
    pub weights: String,
    pub n_layers: usize,
    pub d_ff: usize,
    pub vocab: usize,
}

/// Per-neuron statistics of one polarity; neuron `i` is layer `i / d_ff`, index `i % d_ff`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolarityTable {
    /// logsumexp over the whole vocabulary.
    pub lse: Vec<f32>,
    /// logsumexp of the top-100 logits.
    pub lse_top: Vec<f32>,
    /// Top-k token ids, `[n, k]`, most likely first.
    pub ids: Vec<u32>,
    /// Their probabilities (full softmax), `[n, k]`.
    pub probs: Vec<f32>,
}

impl PolarityTable {
    fn with_capacity(n: usize, k: usize) -> Self {
        Self { lse: Vec::with_capacity(n), lse_top: Vec::with_capacity(n), ids: Vec::with_capacity(n * k), probs: Vec::with_capacity(n * k) }
    }
}

/// Per-neuron moments of the positive-polarity logits `W_U · w` over the whole vocabulary (the
/// negative polarity has the same std and kurtosis, and the mean and skew negated).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MomentTable {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub skew: Vec<f32>,
    /// Not the excess: a Gaussian has 3.
    pub kurtosis: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeuronMap {
    pub meta: MapMeta,
    pub pos: PolarityTable,
    pub neg: PolarityTable,
    pub moments: MomentTable,
    /// [`NeuronMap::lse_top_std`] and [`NeuronMap::median_std`], derived on first use.
    std_top: OnceLock<[Vec<f32>; 2]>,
    median_std: OnceLock<f32>,
}

impl NeuronMap {
    pub fn new(meta: MapMeta, pos: PolarityTable, neg: PolarityTable, moments: MomentTable) -> Self {
        Self { meta, pos, neg, moments, std_top: OnceLock::new(), median_std: OnceLock::new() }
    }
    /// The median of the neurons' logit standard deviations: the scale partition neurons are
    /// measured against, and what tells a flat map (`analysis::default_scale`). Computed once:
    /// searches, neuron details and the model list ask for it on every request.
    pub fn median_std(&self) -> f32 {
        *self.median_std.get_or_init(|| {
            let mut s = self.moments.std.clone();
            if s.is_empty() {
                return 0.0;
            }
            let mid = s.len() / 2;
            *s.select_nth_unstable_by(mid, f32::total_cmp).1
        })
    }
    /// 1 / the standard deviation of neuron `i`'s logits over the vocabulary: the factor
    /// [`Scale::Std`](shared::Scale::Std) multiplies its logits with (1 for a neuron whose logits are all equal).
    pub fn inv_std(&self, i: usize) -> f32 {
        match self.moments.std.get(i) {
            Some(&s) if s > 0.0 && s.is_finite() => 1.0 / s,
            _ => 1.0,
        }
    }
    /// The logsumexp of every neuron's top-100 logits after [`Scale::Std`](shared::Scale::Std) (each neuron's
    /// logits times [`NeuronMap::inv_std`]), `[pos, neg]`: what the scaled normalised
    /// probability divides by. A positive scale keeps the top 100, so their logits come back
    /// from the stored probabilities (ln p + logsumexp) without decoding again; computed once
    /// per map, on first use (32 ms for Gemma 3 270M's 36,864 neurons on 2 cores).
    pub fn lse_top_std(&self) -> &[Vec<f32>; 2] {
        self.std_top.get_or_init(|| {
            use rayon::prelude::*;
            let k = self.meta.k;
            let top = NORM_TOP.min(k);
            [&self.pos, &self.neg].map(|t| {
                (0..self.n_neurons())
                    .into_par_iter()
                    .map(|i| {
                        let s = self.inv_std(i);
                        // A probability that underflowed to 0 adds nothing (ln 0 = -inf).
                        logsumexp(t.probs[i * k..i * k + top].iter().map(|&p| s * (p.ln() + t.lse[i])))
                    })
                    .collect()
            })
        })
    }
    pub fn n_neurons(&self) -> usize {
        self.meta.n_layers * self.meta.d_ff
    }
    pub fn table(&self, p: Polarity) -> &PolarityTable {
        match p {
            Polarity::Pos => &self.pos,
            Polarity::Neg => &self.neg,
        }
    }
    pub fn index(&self, layer: usize, neuron: usize) -> usize {
        layer * self.meta.d_ff + neuron
    }
    /// Top-k ids and probabilities of one neuron.
    pub fn top(&self, p: Polarity, layer: usize, neuron: usize) -> (&[u32], &[f32]) {
        let (i, k) = (self.index(layer, neuron), self.meta.k);
        let t = self.table(p);
        (&t.ids[i * k..(i + 1) * k], &t.probs[i * k..(i + 1) * k])
    }
    /// The polarity whose decoding of one neuron is the more peaked (the larger top probability):
    /// what the neuron is about, when one polarity must be shown.
    pub fn peaked_polarity(&self, layer: usize, neuron: usize) -> Polarity {
        let (pos, neg) = (self.top(Polarity::Pos, layer, neuron).1, self.top(Polarity::Neg, layer, neuron).1);
        if pos.first() >= neg.first() {
            Polarity::Pos
        } else {
            Polarity::Neg
        }
    }
    /// The normalised probabilities p / mean(top-100 p) of one neuron's top tokens (in
    /// [`NeuronMap::top`]'s order) after `scale`.
    pub fn normalised_top(&self, p: Polarity, layer: usize, neuron: usize, scale: Scale) -> Vec<f32> {
        let i = self.index(layer, neuron);
        let probs = self.top(p, layer, neuron).1;
        match scale {
            Scale::Raw => {
                let m = self.log_mean_top(p, i);
                probs.iter().map(|&q| (q.ln() - m).exp()).collect()
            }
            Scale::Std => {
                let (s, lse) = (self.inv_std(i), self.table(p).lse[i]);
                let lse_top = self.lse_top_std()[(p == Polarity::Neg) as usize][i];
                let ln_top = (NORM_TOP as f32).ln();
                probs.iter().map(|&q| (s * (q.ln() + lse) - lse_top + ln_top).exp()).collect()
            }
        }
    }
    /// log(mean of the top-100 probabilities) of one neuron.
    pub fn log_mean_top(&self, p: Polarity, i: usize) -> f32 {
        let t = self.table(p);
        t.lse_top[i] - t.lse[i] - (NORM_TOP as f32).ln()
    }

    /// Decode every neuron of `model` in `view`. `progress(done, total)` is called from worker
    /// threads as neurons finish.
    pub fn build(
        model: &dyn LanguageModel,
        view: View,
        final_norm: bool,
        fingerprint: &str,
        weights: &str,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self> {
        let norm = final_norm.then(|| model.final_norm_weight());
        Self::build_with(
            model.config(),
            model.lm_head_weight()?,
            norm,
            &|l| directions(model, view, l),
            view,
            final_norm,
            fingerprint,
            weights,
            progress,
        )
    }

    /// [`NeuronMap::build`] streamed from the model's file, without loading the model: only the
    /// unembedding and one layer's directions are in memory at a time (each tensor is read from
    /// the file when it is needed). Same numbers as the loaded model's map.
    pub fn build_streamed(
        src: &dyn WeightSource,
        cfg: &Config,
        view: View,
        final_norm: bool,
        fingerprint: &str,
        weights: &str,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self> {
        let norm = if final_norm { Some(src.vector(Key::OutNorm)?) } else { None };
        let head = src.dense(if cfg.tied_embeddings { Key::Embed } else { Key::Output })?;
        let dirs = |l: usize| as_directions(view, src.dense(view_key(view, l))?);
        Self::build_with(cfg, head, norm.as_ref(), &dirs, view, final_norm, fingerprint, weights, progress)
    }

    /// The map from the LM head `head` (`[vocab, d]`), the final norm's weight when it is
    /// folded in, and each layer's directions. On a CUDA device it runs there ([`gpu`]): the
    /// head stays in its dtype, and a final norm is folded into the directions (rounded to that
    /// dtype once) instead. On the CPU, the head is converted to f32 with the norm folded in
    /// ([`unembedding_values`]) and the fused [`kernel`] reduces tiles of logits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build_with(
        cfg: &Config,
        head: Tensor,
        norm: Option<&Tensor>,
        layer_dirs: &dyn Fn(usize) -> Result<Tensor>,
        view: View,
        final_norm: bool,
        fingerprint: &str,
        weights: &str,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Self> {
        let n = cfg.n_layers * cfg.d_ff;
        let vocab = head.dims2()?.0;
        let k = TOP_K.min(vocab);
        let mut pos = PolarityTable::with_capacity(n, k);
        let mut neg = PolarityTable::with_capacity(n, k);
        let mut moments = MomentTable::default();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let on_rows = |rows| {
            let now = done.fetch_add(rows, std::sync::atomic::Ordering::Relaxed) + rows;
            progress(now, n);
        };
        // Each layer's reductions go into the tables as soon as they are done, the rows in
        // parallel: the top-100 logsumexps and the top tokens' probabilities are 2k + 2 exps per
        // neuron, and a GPU hands over a layer faster than one core takes them.
        let mut absorb = |f: kernel::Reductions| {
            use rayon::prelude::*;
            let rows = f.rows();
            for (p, table) in [(0, &mut pos), (1, &mut neg)] {
                let (at, at_top) = (table.lse.len(), table.ids.len());
                table.lse.resize(at + rows, 0.0);
                table.lse_top.resize(at + rows, 0.0);
                table.ids.resize(at_top + rows * k, 0);
                table.probs.resize(at_top + rows * k, 0.0);
                table.lse[at..]
                    .par_iter_mut()
                    .zip(table.lse_top[at..].par_iter_mut())
                    .zip(table.ids[at_top..].par_chunks_mut(k))
                    .zip(table.probs[at_top..].par_chunks_mut(k))
                    .enumerate()
                    .for_each(|(r, (((lse, lse_top), ids), probs))| {
                        let (o, l) = ((2 * r + p) * k, f.lse[2 * r + p]);
                        let vals = &f.top_val[o..o + k];
                        *lse = l;
                        *lse_top = logsumexp(vals.iter().take(NORM_TOP).copied());
                        ids.copy_from_slice(&f.top_id[o..o + k]);
                        for (q, v) in probs.iter_mut().zip(vals) {
                            *q = (v - l).exp();
                        }
                    });
            }
            for r in 0..rows {
                let m = f.moments(r);
                moments.mean.push(m.mean as f32);
                moments.std.push(m.variance().sqrt() as f32);
                moments.skew.push(m.skew() as f32);
                moments.kurtosis.push(m.kurtosis() as f32);
            }
        };
        #[cfg(feature = "cuda")]
        let on_gpu = head.device().is_cuda();
        #[cfg(not(feature = "cuda"))]
        let on_gpu = false;
        #[cfg(feature = "cuda")]
        if on_gpu {
            let reducer = gpu::GpuReducer::new(&head)?;
            let g = norm.map(|g| g.to_dtype(DType::F32)).transpose()?;
            // This thread queues the layers; another brings each back and files it as soon as
            // it is done (at most two layers' results wait in between).
            let (tx, rx) = std::sync::mpsc::sync_channel::<gpu::Pending>(1);
            let reducer = &reducer;
            let filed = std::thread::scope(|s| -> Result<()> {
                let filer = s.spawn(|| -> Result<()> {
                    for p in rx {
                        let rows = p.rows();
                        let layer = reducer.collect(p)?;
                        let t = std::time::Instant::now();
                        absorb(layer);
                        gpu::add_since(&gpu::FILE_NS, t);
                        on_rows(rows);
                    }
                    Ok(())
                });
                let queued = (0..cfg.n_layers).try_for_each(|layer| -> Result<()> {
                    let dirs = layer_dirs(layer)?;
                    let parts = match &g {
                        Some(g) => split_directions(&dirs.broadcast_mul(g)?, reducer.dtype())?,
                        None => vec![dirs],
                    };
                    // The filer stops only on an error, which is the one returned below.
                    tx.send(reducer.launch(&parts, k)?).map_err(|_| crate::error::Error::bad("the GPU map's filer stopped"))
                });
                drop(tx);
                let filed = filer.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                filed.and(queued)
            });
            filed?;
        }
        if !on_gpu {
            let (wu, _, d) = unembedding_values(&head, norm)?;
            drop(head);
            let reducer = kernel::Reducer::new(&wu, d);
            for layer in 0..cfg.n_layers {
                let dirs: Vec<f32> = layer_dirs(layer)?.flatten_all()?.to_vec1()?;
                absorb(kernel::Reductions::from_rows(&reducer.reduce(&dirs, k, &on_rows), k, vocab));
            }
        }
        let meta = MapMeta {
            model_fingerprint: fingerprint.to_owned(),
            view,
            final_norm,
            k,
            weights: weights.to_owned(),
            n_layers: cfg.n_layers,
            d_ff: cfg.d_ff,
            vocab,
        };
        Ok(Self::new(meta, pos, neg, moments))
    }
}

fn logsumexp(xs: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = xs.clone().fold(f32::NEG_INFINITY, f32::max);
    (m as f64 + xs.map(|x| ((x - m) as f64).exp()).sum::<f64>().ln()) as f32
}

/// The unembedding `[vocab, d]` in f32, with the final RMSNorm weight folded in when asked:
/// (w ⊙ g) · u = w · (g ⊙ u).
pub fn unembedding(model: &dyn LanguageModel, final_norm: bool) -> Result<Tensor> {
    let (wu, vocab, d) = unembedding_values(&model.lm_head_weight()?, final_norm.then(|| model.final_norm_weight()))?;
    Ok(Tensor::from_vec(wu, (vocab, d), model.device())?)
}

/// [`unembedding`]'s values, row-major, with its shape, from `W_U` in any dtype and the final
/// norm's weight `g` when it is folded in. Converted straight into the one f32 buffer (the
/// unembedding is the largest tensor: 2 GB of f32 for Llama 3.1 8B, so no intermediate copies).
pub fn unembedding_values(wu: &Tensor, g: Option<&Tensor>) -> Result<(Vec<f32>, usize, usize)> {
    let (vocab, d) = wu.dims2()?;
    let mut values = f32_values(wu)?;
    if let Some(g) = g {
        let g: Vec<f32> = g.to_dtype(DType::F32)?.to_vec1()?;
        for row in values.chunks_exact_mut(d) {
            row.iter_mut().zip(&g).for_each(|(x, g)| *x *= g);
        }
    }
    Ok((values, vocab, d))
}

/// f32 directions `x` as parts in `dtype` whose sum is `x` to about 16 bits: for bf16 or f16,
/// `hi = round(x)` and `lo = round(x - hi)`; for f32, `x` itself. The GPU map multiplies each
/// part with the unembedding as stored and sums the logits in f32: the model's directions are
/// exact in its dtype, but with the final norm folded in they are not, and rounding them once
/// moved the top logits by up to 2% and reordered a tenth of the top tokens against the CPU's
/// map (which folds the norm into its f32 copy of the unembedding). Two products instead of one,
/// for final-norm maps only.
pub fn split_directions(x: &Tensor, dtype: DType) -> Result<Vec<Tensor>> {
    if dtype == DType::F32 {
        return Ok(vec![x.clone()]);
    }
    let hi = x.to_dtype(dtype)?;
    let lo = (x - hi.to_dtype(x.dtype())?)?.to_dtype(dtype)?;
    Ok(vec![hi, lo])
}

/// The weight that holds `view`'s directions of `layer` (down's are its columns).
pub fn view_key(view: View, layer: usize) -> Key {
    match view {
        View::Up => Key::Up(layer),
        View::Gate => Key::Gate(layer),
        View::Down => Key::Down(layer),
    }
}

/// The directions `[d_ff, d]` (f32, contiguous) that `view`'s weight holds.
fn as_directions(view: View, w: Tensor) -> Result<Tensor> {
    let w = if view == View::Down { w.t()? } else { w };
    Ok(w.to_dtype(DType::F32)?.contiguous()?)
}

/// The decoded direction of every neuron of `layer` in `view`, `[d_ff, d]`, f32, contiguous.
/// Only that view's weight is made dense (dequantized, for a quantized model).
pub fn directions(model: &dyn LanguageModel, view: View, layer: usize) -> Result<Tensor> {
    let mlp = model.mlp(layer);
    let w = match view {
        View::Up => &mlp.up,
        View::Gate => &mlp.gate,
        View::Down => &mlp.down,
    };
    as_directions(view, w.dense()?)
}

/// The decoded direction of one neuron in `view`, `[d]`, f32: row `neuron` of
/// [`directions`], but only that neuron's weights are made dense.
pub fn direction(model: &dyn LanguageModel, view: View, layer: usize, neuron: usize) -> Result<Tensor> {
    let mlp = model.mlp(layer);
    let v = match view {
        View::Up => mlp.up.row(neuron)?,
        View::Gate => mlp.gate.row(neuron)?,
        View::Down => mlp.down.column(neuron)?,
    };
    Ok(v.to_dtype(DType::F32)?.contiguous()?)
}

/// Every neuron of `layer` in `view` against each row of `u` (`[n, d]`, f32): `u · dirsᵀ`,
/// `[n, d_ff]`, what [`directions`] would give, but a layer held as quantized blocks is
/// multiplied in place instead of being made dense.
pub fn project(model: &dyn LanguageModel, view: View, layer: usize, u: &Tensor) -> Result<Tensor> {
    let mlp = model.mlp(layer);
    match view {
        View::Up => mlp.up.forward_f32(u),
        View::Gate => mlp.gate.forward_f32(u),
        View::Down => mlp.down.forward_t_f32(u),
    }
}

/// A tensor's values as one f32 vector, converted from the storage in place (no f32 tensor in
/// between) when the tensor is a contiguous CPU tensor.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    use candle_core::{CpuStorage, Storage};
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(s), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            match s {
                CpuStorage::F32(v) => return Ok(v[a..b].to_vec()),
                CpuStorage::BF16(v) => return Ok(v[a..b].iter().map(|x| x.to_f32()).collect()),
                CpuStorage::F16(v) => return Ok(v[a..b].iter().map(|x| x.to_f32()).collect()),
                _ => {}
            }
        }
    }
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Where maps are cached: `$FLASH_INTERP_CACHE`, else `cache/` beside the default models.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("FLASH_INTERP_CACHE").map(PathBuf::from).unwrap_or_else(|| crate::fetch::models_dir().join("cache"))
}

/// The cache file of a map.
pub fn cache_path(dir: &Path, model_name: &str, fingerprint: &str, view: View, final_norm: bool) -> PathBuf {
    let fp = &fingerprint[..fingerprint.len().min(16)];
    let norm = if final_norm { "-finalnorm" } else { "" };
    dir.join(format!("{model_name}-{fp}-{}{norm}.fimap", view.as_str()))
}
