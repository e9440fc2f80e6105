//! The model: configuration, weight sources, and one forward pass per family (`llama.rs`,
//! `gemma3.rs`), each with interventions (neuron clamps) at the input of down_proj.
pub mod attention;
pub mod common;
pub mod config;
pub mod exact;
pub mod fused;
pub mod gemma3;
pub mod graph;
pub mod llama;
pub mod weights;

use candle_core::{DType, Device, Tensor};

pub use common::{all_finite, softmax, Cache, Clamp, ForwardOutput, Intervention, Linear, Mlp, Room, Shell, StepGroup};
pub use config::{Arch, Config};
pub use gemma3::Gemma3;
pub use llama::Llama;
pub use weights::{GgufSource, Key, SafetensorsSource, WeightMode, WeightSource};

use crate::error::{Error, Result};

/// A loaded model of any supported family: what the engine, the map and the analyses use.
/// Immutable; shared in an `Arc`.
pub trait LanguageModel: Send + Sync + std::fmt::Debug {
    /// The settings, embedding, final norm and LM head every family holds.
    fn shell(&self) -> &Shell;
    /// The MLP of one layer.
    fn mlp(&self, layer: usize) -> &Mlp;

    fn config(&self) -> &Config {
        &self.shell().cfg
    }
    fn device(&self) -> &Device {
        &self.shell().device
    }
    /// The compute dtype.
    fn dtype(&self) -> DType {
        self.shell().dtype
    }
    /// The unembedding `W_U` `[vocab, d_model]` as it is held.
    fn lm_head(&self) -> &Linear {
        &self.shell().lm_head
    }
    /// The unembedding `W_U` as a dense `[vocab, d_model]` tensor.
    fn lm_head_weight(&self) -> Result<Tensor> {
        self.shell().lm_head.dense()
    }
    /// The final RMSNorm's scale `[d_model]` (for Gemma, `1 + w`).
    fn final_norm_weight(&self) -> &Tensor {
        &self.shell().norm.weight
    }
    /// Bytes of every weight a forward pass reads, as held in memory (the token embedding is
    /// only indexed, unless it is also the tied LM head).
    fn weight_bytes(&self) -> usize;

    /// Blocks whose decoding steps take the fused path ([`fused`]).
    fn fused_blocks(&self) -> usize {
        0
    }

    /// The family's forward pass (see [`LanguageModel::forward`]).
    fn run(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput>;

    /// The family's decoding step of several groups at once (see [`LanguageModel::step`]).
    fn run_step(&self, groups: &mut [StepGroup]) -> Result<Tensor>;

    /// One decoding step of several independent groups of rows (several requests) as one batch:
    /// each group feeds one token per row and has its own cache, positions and interventions.
    /// The matrix products run once over every group's rows; RoPE, the cache and attention run
    /// per group. Returns the logits `[rows, vocab]` (f32), the groups' rows in order; each row
    /// is what [`LanguageModel::forward`] on that group alone gives, up to summation order.
    /// Logits are not checked for finiteness: one group's overflow is that group's error, and
    /// cancellation is checked between steps by the caller.
    fn step(&self, groups: &mut [StepGroup]) -> Result<Tensor> {
        on_pool(self.device(), || self.run_step(groups))
    }

    /// [`LanguageModel::forward`] without the check that every row's logits are finite: for
    /// callers that judge each row on its own (a batch of many clamps where one extreme value may
    /// overflow).
    ///
    /// On the CPU the pass runs on a thread of rayon's pool, which its parallel matmuls use: the
    /// caller's thread waits asleep, so the pool's threads (one per core) are the only ones that
    /// run. Called from a thread outside the pool, the small serial ops between matmuls would
    /// otherwise compete for the cores with the pool's threads spinning for work (a quarter of
    /// one token's time on 2 cores).
    fn forward_rows(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput> {
        on_pool(self.device(), || self.run(input, cache, rows, record))
    }

    /// Check an intervention against the model's shape.
    fn validate(&self, iv: &Intervention) -> Result<()> {
        common::validate(self.config(), iv)
    }

    /// Run `input` (`[b, t]` u32 token ids) through the model, appending to `cache`.
    ///
    /// `rows` gives one intervention per batch row, or a single one for all rows. If `input` has
    /// one row and `rows` has `n > 1`, the batch is expanded to `n` at the first layer where the
    /// rows differ: the shared prefix of the computation runs once (used by sweeps and by paired
    /// normal/steered generation). `record` lists layers whose MLP activations (after any clamp)
    /// are returned.
    fn forward(&self, input: &Tensor, cache: &mut Cache, rows: &[Intervention], record: &[usize]) -> Result<ForwardOutput> {
        let out = self.forward_rows(input, cache, rows, record)?;
        if !all_finite(&out.logits)? {
            return Err(non_finite());
        }
        Ok(out)
    }
}

/// Run a model pass on a thread of rayon's pool when it runs on the CPU from outside the pool
/// (see [`LanguageModel::forward_rows`]).
fn on_pool<T: Send>(device: &Device, pass: impl FnOnce() -> T + Send) -> T {
    if device.is_cpu() && rayon::current_thread_index().is_none() {
        rayon::scope(|_| pass())
    } else {
        pass()
    }
}

/// The error of logits that are not finite.
pub(crate) fn non_finite() -> Error {
    Error::NonFinite("the model's output is not a finite number for this input (an overflow: try smaller clamp values)".into())
}

/// Load the forward pass of `cfg.arch` over `src`.
pub fn load(src: &dyn WeightSource, cfg: &Config) -> Result<Box<dyn LanguageModel>> {
    Ok(match cfg.arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => Box::new(Llama::load(src, cfg)?),
        Arch::Gemma3(_) | Arch::Gemma2(_) => Box::new(Gemma3::load(src, cfg)?),
    })
}
