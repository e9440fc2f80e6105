//! The engine: a loaded model with its tokenizer and chat template, and the queries the product
//! runs on it (next-token distribution, generation with clamps, clamp sweeps). Used by the CLI and
//! the HTTP API alike; all validation of user input happens here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use rayon::prelude::*;
use shared::limits::MAX_CLAMPS;
use shared::{
    ClampSpec, Completion, GenerateRequest, GenerateResponse, NextTokenRequest, NextTokenResponse, PromptSpec, SamplingParams, StopReason,
    SweepPoint, SweepRequest, SweepResponse, TokenProb, TokenStep, Variant, View,
};

use crate::cancel::Cancel;
use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::limits;
use crate::map::{self, NeuronMap};
use crate::model::config::Gemma3Params;
use crate::model::config::HfConfig;
use crate::model::graph::DecodeGraph;
use crate::model::{Arch, Cache, Clamp, Config, GgufSource, Intervention, Key, LanguageModel, Room, SafetensorsSource, WeightMode, WeightSource};
use crate::prompt_cache::{Entry, PromptCache};
use crate::sampling::Sampler;
use crate::tokenizer::Tok;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub mode: WeightMode,
    /// Cap on the context (RoPE table and KV cache); the model's own limit applies if smaller.
    pub max_context: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, mode: WeightMode::Auto, max_context: 8192 }
    }
}

/// CUDA device `ordinal`, with one stream that every thread's work goes to.
///
/// candle's `Device::new_cuda` queues each host thread's work on that thread's own default
/// stream, and those streams are not ordered with one another. The server hands tensors from
/// thread to thread (a prompt's KV cache from its worker to the batch's thread; rows freed on
/// another thread than the one that wrote them), so with per-thread streams a kernel could
/// read a cache another thread's kernels have not finished writing. On one stream, the order
/// the host queues work in is the order it runs in, and a hand-off between threads (a channel,
/// a lock) orders the queueing. cudarc's per-use event tracking, which orders several streams,
/// is then of no use and costs an event record per kernel argument: it is turned off.
///
/// cudarc allocates with `cuMemAllocAsync` from the device's default memory pool, whose release
/// threshold is 0: each synchronisation (one per decoded token) would give the freed memory
/// back to the driver and the next token map it again. The pool keeps up to 4 GiB instead (a
/// decoding step's activations many times over), as PyTorch's caching allocator keeps what it
/// freed; more than that (a map build's buffers) still goes back, so that a peer started after
/// a build (`bench`) finds the memory free. A failure to set it is logged and changes nothing
/// else.
#[cfg(feature = "cuda")]
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let device = Device::new_cuda_with_stream(ordinal)?;
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    // SAFETY: every tensor of this device is queued on its one stream (candle's ops, cuBLAS and
    // cuRAND are bound to it, and `map::gpu` uses `cuda_stream()`), so no slice needs events to
    // order its uses across streams. The one exception orders itself: `map::gpu`'s `collect`
    // reads a layer's results on a second stream after that layer's event, and the buffers are
    // dropped (freed on the first stream) only after the host has seen those copies finish.
    unsafe { ctx.disable_event_tracking() };
    if ctx.has_async_alloc() {
        let mut keep: u64 = 4 << 30;
        // SAFETY: the device is the context's own; the release threshold's value is a cuuint64_t.
        let set = unsafe {
            result::device::get_default_mem_pool(ctx.cu_device()).and_then(|pool| {
                result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut keep as *mut u64).cast())
            })
        };
        if let Err(e) = set {
            tracing::warn!("cuda:{ordinal}: the memory pool's release threshold could not be set ({e}); freed memory goes back to the driver");
        }
    }
    Ok(device)
}

/// Without the `cuda` feature: candle's error saying so.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Short name, from the file or directory name.
    pub name: String,
    pub path: PathBuf,
    /// "gguf" or "safetensors".
    pub format: &'static str,
}

/// A model file opened but not loaded (see [`Engine::open`]).
pub struct Opened {
    pub src: Box<dyn WeightSource>,
    pub cfg: Config,
    pub tok: Tok,
    pub chat: Option<ChatTemplate>,
    pub info: ModelInfo,
}

/// The key a cached map must match.
fn map_meta(cfg: &Config, fingerprint: &str, view: View, final_norm: bool, weights: String) -> map::MapMeta {
    map::MapMeta {
        model_fingerprint: fingerprint.to_owned(),
        view,
        final_norm,
        k: map::TOP_K.min(cfg.vocab_size),
        weights,
        n_layers: cfg.n_layers,
        d_ff: cfg.d_ff,
        vocab: cfg.vocab_size,
    }
}

/// The map cached at `path` if it matches `expect`, else `build`'s (then cached atomically). A
/// stale or corrupt cache file is rebuilt, never trusted.
fn load_or_build(path: &Path, expect: &map::MapMeta, build: impl FnOnce() -> Result<NeuronMap>) -> Result<(NeuronMap, MapOrigin)> {
    match map::cache::load(path, expect) {
        Ok(m) => Ok((m, MapOrigin::Cache)),
        Err(e) => {
            if path.exists() {
                tracing::warn!("{e}; rebuilding");
            }
            let start = Instant::now();
            let m = build()?;
            let secs = start.elapsed().as_secs_f64();
            if let Err(e) = map::cache::save(&m, path) {
                tracing::warn!("could not cache the map at {}: {e}", path.display());
            }
            Ok((m, MapOrigin::Built(secs)))
        }
    }
}

/// The neuron map of a model file, from the cache in `cache_dir` or built streamed from the file
/// ([`NeuronMap::build_streamed`]) without loading the model: what `flash-interp map` runs, in
/// memory for the unembedding and one layer. The cache is the one a loaded engine reads;
/// `rebuild` deletes it first.
#[allow(clippy::too_many_arguments)]
pub fn map_from_file(
    path: &Path,
    opts: &LoadOptions,
    cache_dir: &Path,
    view: View,
    final_norm: bool,
    rebuild: bool,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(NeuronMap, MapOrigin, ModelInfo)> {
    let o = Engine::open(path, opts)?;
    o.cfg.check().map_err(|e| Error::model(path, e))?;
    let fp = map::cache::fingerprint(path)?;
    let weights = o.src.mode().desc();
    let expect = map_meta(&o.cfg, &fp, view, final_norm, weights.clone());
    let cache = map::cache_path(cache_dir, &o.info.name, &fp, view, final_norm);
    if rebuild {
        match std::fs::remove_file(&cache) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let (m, origin) = load_or_build(&cache, &expect, || NeuronMap::build_streamed(&*o.src, &o.cfg, view, final_norm, &fp, &weights, progress))?;
    Ok((m, origin, o.info))
}

pub struct Engine {
    pub model: Arc<dyn LanguageModel>,
    pub tok: Tok,
    pub chat: Option<ChatTemplate>,
    pub info: ModelInfo,
    /// How the weights are held (resolved: never `Auto`).
    mode: WeightMode,
    /// Where neuron maps are cached.
    pub cache_dir: PathBuf,
    fingerprint: OnceLock<String>,
    maps: Mutex<HashMap<(View, bool), Arc<NeuronMap>>>,
    /// One lock per map, held while it is loaded or built: concurrent requests for the same map
    /// wait for one build, and never for another map's.
    map_build: Mutex<HashMap<MapKey, Arc<Mutex<()>>>>,
    pub(crate) derived: crate::analysis::Derived,
    /// Bytes of weights one forward pass reads (for the work estimates).
    weight_bytes: usize,
}

/// A map's key: its view, and whether the final norm is folded in.
type MapKey = (View, bool);

/// Where a neuron map came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MapOrigin {
    Memory,
    Cache,
    /// Built now, in this many seconds.
    Built(f64),
}

/// One finished generation, before it becomes a `shared::Completion`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOutput {
    pub tokens: Vec<u32>,
    /// One per token of `tokens`.
    pub steps: Vec<TokenStep>,
    pub text: String,
    pub stop: StopReason,
    pub tokens_per_second: f64,
}

/// Result of a clamp sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepResult {
    pub baseline: f32,
    pub natural_value: f32,
    pub probs: Vec<f32>,
}

/// A row's sampled token, and its hover unless the token ends the row.
type Sampled = (u32, Option<TokenStep>);

/// A generation in progress ([`Engine::start_generation`]): its rows (an intervention and a
/// sampler each) after the prompt, the cache holding them, and what each row has produced so
/// far. [`Engine::advance`] moves it a step; [`Engine::generate_rows`] drives one alone, the
/// [`crate::batch::Batcher`] many side by side in one batch.
pub struct Generation {
    pub(crate) variants: Vec<Intervention>,
    samplers: Vec<Sampler>,
    pub(crate) cache: Cache,
    gen: Vec<Vec<u32>>,
    steps: Vec<Vec<TokenStep>>,
    /// Steps whose text has not been sent yet (a character still incomplete).
    unsent: Vec<usize>,
    /// Sequences fed to the model; a finished row keeps being fed its last token (ignored).
    seqs: Vec<Vec<u32>>,
    stop: Vec<Option<StopReason>>,
    /// The text streamed so far, decoded a window at a time.
    texts: Vec<String>,
    streams: Vec<crate::tokenizer::TextStream>,
    step: usize,
    max_new: usize,
    start: Instant,
}

impl Generation {
    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.seqs.len()
    }
}

impl Engine {
    /// Load a GGUF file, or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let o = Self::open(path, opts)?;
        let model = crate::model::load(&*o.src, &o.cfg)?;
        Ok(Self::assemble(model, o.tok, o.chat, o.info, o.src.mode()))
    }

    /// Open a model file without loading its weights: its settings, tokenizer and chat template,
    /// and the source the weights are read from.
    pub fn open(path: &Path, opts: &LoadOptions) -> Result<Opened> {
        let name = path.file_name().map(|s| s.to_string_lossy().trim_end_matches(".gguf").to_owned()).unwrap_or_else(|| "model".into());
        if path.is_dir() {
            Self::open_hf(path, opts, name)
        } else {
            Self::open_gguf(path, opts, name)
        }
    }

    fn open_gguf(path: &Path, opts: &LoadOptions, name: String) -> Result<Opened> {
        let src = GgufSource::open(path, &opts.device, opts.mode)?;
        let c = &src.content;
        let arch = c.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if !matches!(arch.as_str(), "llama" | "gemma2" | "gemma3" | "qwen2" | "qwen3") {
            return Err(Error::model(path, format!("architecture {arch:?} is not supported; supported: {}", Arch::SUPPORTED)));
        }
        let get = |k: &str| c.metadata.get(&format!("{arch}.{k}"));
        let req = |k: &str| -> Result<usize> {
            get(k)
                .and_then(|v| v.to_u32().ok().map(|x| x as usize).or_else(|| v.to_u64().ok().map(|x| x as usize)))
                .ok_or_else(|| Error::model(path, format!("missing metadata {arch}.{k}")))
        };
        let n_heads = req("attention.head_count")?;
        let d_model = req("embedding_length")?;
        let head_dim = req("attention.key_length").or_else(|_| req("rope.dimension_count")).unwrap_or(d_model / n_heads.max(1));
        let family = match arch.as_str() {
            // llama.cpp's defaults for what a Gemma 3 GGUF may leave out.
            "gemma3" => Arch::Gemma3(Gemma3Params {
                sliding_window: req("attention.sliding_window")?,
                pattern: req("attention.sliding_window_type").unwrap_or(6),
                rope_local_theta: get("rope.local_freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0),
                query_pre_attn_scalar: head_dim as f32,
                final_logit_softcap: get("final_logit_softcapping").and_then(|v| v.to_f32().ok()),
                attn_logit_softcap: None,
                global_rope_factor: get("rope.scaling.factor").and_then(|v| v.to_f32().ok()).unwrap_or(1.0),
            }),
            // Gemma 2 alternates local and global layers on one RoPE base.
            "gemma2" => Arch::Gemma2(Gemma3Params {
                sliding_window: req("attention.sliding_window")?,
                pattern: 2,
                rope_local_theta: get("rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0),
                query_pre_attn_scalar: head_dim as f32,
                final_logit_softcap: get("final_logit_softcapping").and_then(|v| v.to_f32().ok()),
                attn_logit_softcap: get("attn_logit_softcapping").and_then(|v| v.to_f32().ok()),
                global_rope_factor: 1.0,
            }),
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            _ => Arch::Llama,
        };
        // llama.cpp permutes only Llama's Q/K rows for the interleaved RoPE; Gemma and Qwen use
        // the split halves (NEOX) as stored.
        let interleaved = family == Arch::Llama;
        let embed_rows = c.tensor_infos.get("token_embd.weight").and_then(|t| t.shape.dims().first().copied()).unwrap_or(0);
        let rope_freq_factors = src.raw_f32("rope_freqs.weight")?.map(|t| t.to_vec1::<f32>()).transpose()?;
        let cfg = Config {
            arch: family,
            n_layers: req("block_count")?,
            d_model,
            d_ff: req("feed_forward_length")?,
            n_heads,
            n_kv_heads: req("attention.head_count_kv").unwrap_or(n_heads),
            head_dim,
            vocab_size: req("vocab_size").unwrap_or(embed_rows),
            rms_eps: get("attention.layer_norm_rms_epsilon").and_then(|v| v.to_f32().ok()).unwrap_or(1e-5) as f64,
            rope_theta: get("rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0),
            rope_scaling: None,
            rope_freq_factors,
            rope_interleaved: interleaved,
            max_seq_len: req("context_length").unwrap_or(2048).min(opts.max_context),
            tied_embeddings: !src.has(Key::Output),
        };
        let tok = Tok::from_gguf(c)?;
        let chat = match c.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
            Some(t) => Some(ChatTemplate::new(t, tok.bos_token.as_deref(), tok.eos_token.as_deref())?),
            None => None,
        };
        Ok(Opened { src: Box::new(src), cfg, tok, chat, info: ModelInfo { name, path: path.to_owned(), format: "gguf" } })
    }

    fn open_hf(dir: &Path, opts: &LoadOptions, name: String) -> Result<Opened> {
        let cfg_path = dir.join("config.json");
        let raw = std::fs::read(&cfg_path).map_err(|e| Error::model(&cfg_path, e))?;
        let json: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| Error::model(&cfg_path, e))?;
        let model_type = json["model_type"].as_str().unwrap_or("llama");
        let family = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3_text" => Arch::Gemma3(gemma_params(&json, 6).map_err(|e| Error::model(&cfg_path, e))?),
            "gemma2" => Arch::Gemma2(gemma_params(&json, 2).map_err(|e| Error::model(&cfg_path, e))?),
            other => {
                let hint = if other == "gemma3" { " (the multimodal checkpoint: use its text model, model_type gemma3_text)" } else { "" };
                return Err(Error::model(&cfg_path, format!("model_type {other:?}{hint} is not supported; supported: {}", Arch::SUPPORTED)));
            }
        };
        let gemma = family.gemma().is_some();
        let lc: HfConfig = serde_json::from_value(json.clone()).map_err(|e| Error::model(dir.join("config.json"), e))?;
        let rope_scaling = lc.llama3_rope_scaling();
        let src = SafetensorsSource::open(dir, &opts.device, opts.mode, gemma)?;
        // A sliding window (Mistral's; Qwen's when `use_sliding_window`) never matters within a
        // context no longer than the window.
        let windowed = model_type == "mistral" || json["use_sliding_window"].as_bool() == Some(true);
        let window = json["sliding_window"].as_u64().filter(|_| windowed).map_or(usize::MAX, |w| w as usize);
        let cfg = Config {
            arch: family,
            n_layers: lc.num_hidden_layers,
            d_model: lc.hidden_size,
            d_ff: lc.intermediate_size,
            n_heads: lc.num_attention_heads,
            n_kv_heads: lc.num_key_value_heads(),
            head_dim: json["head_dim"].as_u64().map(|x| x as usize).unwrap_or(lc.hidden_size / lc.num_attention_heads),
            vocab_size: lc.vocab_size,
            rms_eps: lc.rms_norm_eps,
            rope_theta: lc.rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            rope_interleaved: false,
            max_seq_len: lc.max_position_embeddings.min(opts.max_context).min(window),
            // Gemma ties its head unless told otherwise.
            tied_embeddings: lc.tie_word_embeddings.unwrap_or(gemma) || !src.has(Key::Output),
        };
        let eos = lc.eos_ids();
        let tok = Tok::from_hf_dir(dir, &eos)?;
        let tc: serde_json::Value =
            std::fs::read(dir.join("tokenizer_config.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(serde_json::Value::Null);
        let template = match &tc["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => {
                a.iter().find(|t| t["name"] == "default").or(a.first()).and_then(|t| t["template"].as_str().map(str::to_owned))
            }
            _ => None,
        };
        let chat = match template {
            Some(t) => Some(ChatTemplate::new(&t, tok.bos_token.as_deref(), tok.eos_token.as_deref())?),
            None => None,
        };
        Ok(Opened { src: Box::new(src), cfg, tok, chat, info: ModelInfo { name, path: dir.to_owned(), format: "safetensors" } })
    }

    fn assemble(model: Box<dyn LanguageModel>, tok: Tok, chat: Option<ChatTemplate>, info: ModelInfo, mode: WeightMode) -> Self {
        let weight_bytes = model.weight_bytes();
        Self {
            mode,
            model: Arc::from(model),
            tok,
            chat,
            info,
            cache_dir: map::cache_dir(),
            fingerprint: OnceLock::new(),
            maps: Mutex::new(HashMap::new()),
            map_build: Mutex::default(),
            derived: Default::default(),
            weight_bytes,
        }
    }

    pub fn config(&self) -> &Config {
        self.model.config()
    }

    /// Content fingerprint of the model file(s), computed once.
    pub fn fingerprint(&self) -> Result<&str> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f);
        }
        let f = map::cache::fingerprint(&self.info.path)?;
        Ok(self.fingerprint.get_or_init(|| f))
    }

    /// How the weights are held, as recorded in map caches ("f32", "f16", "bf16", "quantized").
    pub fn weights_desc(&self) -> String {
        self.mode.desc()
    }

    /// How the weights are held (resolved: never `Auto`).
    pub fn weight_mode(&self) -> WeightMode {
        self.mode
    }

    /// What a map of this model in `view` is built with: the key a cached map must match.
    pub fn map_meta(&self, view: View, final_norm: bool) -> Result<map::MapMeta> {
        Ok(map_meta(self.config(), self.fingerprint()?, view, final_norm, self.weights_desc()))
    }

    /// Whether the map of `view` is in memory.
    pub fn map_ready(&self, view: View, final_norm: bool) -> bool {
        self.map_if_ready(view, final_norm).is_some()
    }

    /// The map of `view` if it is in memory (never waits).
    pub fn map_if_ready(&self, view: View, final_norm: bool) -> Option<Arc<NeuronMap>> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).get(&(view, final_norm)).cloned()
    }

    /// The map of `view` if it is in memory or in the disk cache (never builds one).
    pub fn cached_map(&self, view: View, final_norm: bool) -> Option<Arc<NeuronMap>> {
        if let Some(m) = self.map_if_ready(view, final_norm) {
            return Some(m);
        }
        let fp = self.map_meta(view, final_norm).ok()?.model_fingerprint;
        map::cache_path(&self.cache_dir, &self.info.name, &fp, view, final_norm)
            .exists()
            .then(|| self.map(view, final_norm, &|_, _| {}).ok().map(|(m, _)| m))
            .flatten()
    }

    /// The neuron map of `view`: from memory, else from the disk cache, else built (and cached
    /// atomically). A stale or corrupt cache file is rebuilt, never trusted.
    pub fn map(&self, view: View, final_norm: bool, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<(Arc<NeuronMap>, MapOrigin)> {
        if let Some(m) = self.map_if_ready(view, final_norm) {
            return Ok((m, MapOrigin::Memory));
        }
        let lock = self.map_build.lock().unwrap_or_else(|e| e.into_inner()).entry((view, final_norm)).or_default().clone();
        let _building = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Another request may have built it while this one waited.
        if let Some(m) = self.map_if_ready(view, final_norm) {
            return Ok((m, MapOrigin::Memory));
        }
        let expect = self.map_meta(view, final_norm)?;
        let fp = expect.model_fingerprint.clone();
        let path = map::cache_path(&self.cache_dir, &self.info.name, &fp, view, final_norm);
        let (m, origin) = load_or_build(&path, &expect, || NeuronMap::build(&*self.model, view, final_norm, &fp, &self.weights_desc(), progress))?;
        let m = Arc::new(m);
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).insert((view, final_norm), m.clone());
        Ok((m, origin))
    }

    /// Token ids of a prompt. Chat prompts go through the model's chat template (the default for
    /// models that have one).
    pub fn prompt_ids(&self, p: &PromptSpec) -> Result<Vec<u32>> {
        let chat = p.chat.unwrap_or(self.chat.is_some());
        let given = p.messages.as_deref().filter(|m| !m.is_empty());
        if given.is_some() && !chat {
            return Err(Error::bad(match p.chat {
                Some(false) => "messages are a conversation for the chat template; with chat: false send the prompt as text",
                _ => "this model has no chat template; send the prompt as text, without messages",
            }));
        }
        let ids = if chat {
            let tmpl = self.chat.as_ref().ok_or_else(|| Error::bad("this model has no chat template; use a plain prompt"))?;
            let messages: Vec<Message> = match given {
                Some(m) => m.iter().map(|m| Message { role: m.role.clone(), content: m.content.clone() }).collect(),
                None => vec![Message { role: "user".into(), content: p.text.clone() }],
            };
            // A role is written into the template as it is: anything but these three would be
            // text the model reads as the template's own control tokens.
            if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
                return Err(Error::bad(format!("role {:?} is not one of system, user, assistant", m.role)));
            }
            for m in &messages {
                limits::check_prompt_text(&m.content)?;
            }
            self.tok.encode_raw(&tmpl.render(&messages)?)?
        } else {
            limits::check_prompt_text(&p.text)?;
            self.tok.encode_prompt(&p.text)?
        };
        if ids.is_empty() {
            return Err(Error::bad("the prompt has no tokens"));
        }
        limits::check_prompt_tokens(ids.len(), 0, self.config().max_seq_len)?;
        Ok(ids)
    }

    /// Validate clamps and turn them into an intervention.
    pub fn intervention(&self, clamps: &[ClampSpec]) -> Result<Intervention> {
        if clamps.len() > MAX_CLAMPS {
            return Err(Error::bad(format!("{} clamps given; at most {MAX_CLAMPS} are allowed", clamps.len())));
        }
        if let Some(why) = ClampSpec::duplicate(clamps) {
            return Err(Error::bad(why));
        }
        let iv = Intervention { clamps: clamps.iter().map(|c| Clamp { layer: c.layer, neuron: c.neuron, value: c.value }).collect() };
        self.model.validate(&iv)?;
        Ok(iv)
    }

    pub(crate) fn input(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(Tensor::new(ids, self.model.device())?.unsqueeze(0)?)
    }

    /// Next-token distribution after `ids`: the `top_k` most likely tokens.
    pub fn next_token(&self, ids: &[u32], iv: &Intervention, top_k: usize, cancel: &Cancel) -> Result<Vec<TokenProb>> {
        limits::check_top_k(top_k)?;
        let mut cache = Cache::with_cancel(self.config(), cancel.clone()).with_room(Room::Scratch);
        let out = self.model.forward(&self.input(ids)?, &mut cache, std::slice::from_ref(iv), &[])?;
        let logits = out.logits.i(0)?;
        let probs = crate::model::softmax(&logits)?.to_vec1::<f32>()?;
        let logits = logits.to_vec1::<f32>()?;
        Ok(top_indices(&probs, top_k)
            .into_iter()
            .map(|i| TokenProb { id: i as u32, text: self.tok.token_text(i as u32), prob: probs[i], logit: logits[i] })
            .collect())
    }

    /// Generate from `ids`, once per intervention in `variants` (one: a plain or steered answer;
    /// two: normal and steered side by side). Every variant samples with the same seed.
    /// `on_text(variant_index, new_text, steps)` streams text as it is produced, with the tokens
    /// it comes from (see [`TokenStep`]); returning `false` cancels. `use_cache = false`
    /// recomputes the whole sequence at each step (a check of the KV cache; same output).
    pub fn generate(
        &self,
        ids: &[u32],
        variants: &[Intervention],
        params: &SamplingParams,
        use_cache: bool,
        cancel: &Cancel,
        on_text: &mut dyn FnMut(usize, &str, &[TokenStep]) -> bool,
    ) -> Result<Vec<GenOutput>> {
        if variants.is_empty() || variants.len() > 2 {
            return Err(Error::bad("generate takes one or two variants"));
        }
        self.generate_rows(ids, variants, &vec![params.seed; variants.len()], params, use_cache, cancel, on_text)
    }

    /// [`Engine::generate`] for any rows, each with its own intervention and seed, as one batch
    /// (at most `2 × MAX_SAMPLES` rows): the prompt runs once and is repeated at the first layer
    /// where the rows' interventions differ; each row samples, stops and streams on its own.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_rows(
        &self,
        ids: &[u32],
        variants: &[Intervention],
        seeds: &[u64],
        params: &SamplingParams,
        use_cache: bool,
        cancel: &Cancel,
        on_text: &mut dyn FnMut(usize, &str, &[TokenStep]) -> bool,
    ) -> Result<Vec<GenOutput>> {
        let (mut g, mut logits) = self.start_generation(ids, variants, seeds, params, cancel, None)?;
        let mut steps = DecodeGraph::new(&*self.model, &g.variants);
        while let Some(next) = self.advance(&mut g, &logits, on_text)? {
            let n = next.len();
            logits = if use_cache {
                g.cache.cancel.check()?;
                steps.step(&*self.model, next, &mut g.cache, &g.variants)?
            } else {
                let t = g.seqs[0].len();
                let flat: Vec<u32> = g.seqs.iter().flatten().copied().collect();
                let input = Tensor::from_vec(flat, (n, t), self.model.device())?;
                self.model.forward(&input, &mut Cache::with_cancel(self.config(), cancel.clone()).with_room(Room::Scratch), &g.variants, &[])?.logits
            };
        }
        self.finish(g, on_text)
    }

    /// A generation's start: its rows checked, and its prompt run into a fresh cache (once per
    /// distinct intervention, and that once only from the first layer where they differ). With
    /// `prompts`, a prompt whose every intervention's run is kept there starts from copies of those
    /// runs instead, and a prompt that runs is kept. Returns the generation and the logits its
    /// first tokens are sampled from.
    pub fn start_generation(
        &self,
        ids: &[u32],
        variants: &[Intervention],
        seeds: &[u64],
        params: &SamplingParams,
        cancel: &Cancel,
        prompts: Option<&PromptCache>,
    ) -> Result<(Generation, Tensor)> {
        limits::check_sampling(params.temperature, params.top_p, params.max_new_tokens)?;
        limits::check_prompt_tokens(ids.len(), params.max_new_tokens, self.config().max_seq_len)?;
        if variants.is_empty() || variants.len() > 2 * shared::limits::MAX_SAMPLES || seeds.len() != variants.len() {
            return Err(Error::bad(format!("generate takes 1 to {} rows, each with a seed", 2 * shared::limits::MAX_SAMPLES)));
        }
        for iv in variants {
            self.model.validate(iv)?;
        }
        let n = variants.len();
        let start = Instant::now();
        // Rows with the same intervention have the same prompt: each distinct intervention runs
        // it once, and its rows get copies of that row's cache and logits (8 samples of a
        // normal and a steered answer are 2 prompts' work, not 16).
        let mut distinct: Vec<Intervention> = Vec::new();
        let index: Vec<u32> = variants
            .iter()
            .map(|iv| {
                let i = distinct.iter().position(|d| d == iv).unwrap_or_else(|| {
                    distinct.push(iv.clone());
                    distinct.len() - 1
                });
                i as u32
            })
            .collect();
        // Room for the prompt and the longest answer at once, rather than twice the prompt.
        let room = Room::Positions(ids.len() + params.max_new_tokens);
        let (cache, logits) = match prompts.and_then(|p| p.get_all(ids, &distinct)) {
            // Every distinct intervention's run of this prompt is kept: each row starts from a
            // copy of its intervention's.
            Some(kept) => {
                let rows: Vec<&Entry> = index.iter().map(|&i| &*kept[i as usize]).collect();
                let kvs: Vec<&[Option<(Tensor, Tensor)>]> = rows.iter().map(|e| e.kvs.as_slice()).collect();
                let cache = Cache::from_rows(self.config(), cancel.clone(), &kvs, ids.len())?.with_room(room);
                (cache, Tensor::cat(&rows.iter().map(|e| &e.logits).collect::<Vec<_>>(), 0)?)
            }
            None => {
                let mut cache = Cache::with_cancel(self.config(), cancel.clone()).with_room(room);
                let mut logits = self.model.forward(&self.input(ids)?, &mut cache, &distinct, &[])?.logits;
                if let Some(p) = prompts {
                    for (row, iv) in distinct.iter().enumerate() {
                        p.put(ids, iv, Entry::of_row(&cache, &logits, row)?);
                    }
                }
                if distinct.len() < n {
                    let index = Tensor::new(index, logits.device())?;
                    cache.select_rows(&index)?;
                    logits = logits.index_select(&index, 0)?;
                }
                (cache, logits)
            }
        };
        let g = Generation {
            variants: variants.to_vec(),
            samplers: seeds.iter().map(|&seed| Sampler::new(&SamplingParams { seed, ..params.clone() })).collect(),
            cache,
            gen: vec![Vec::new(); n],
            steps: vec![Vec::new(); n],
            unsent: vec![0; n],
            seqs: vec![ids.to_vec(); n],
            stop: vec![None; n],
            texts: vec![String::new(); n],
            streams: vec![Default::default(); n],
            step: 0,
            max_new: params.max_new_tokens,
            start,
        };
        Ok((g, logits))
    }

    /// One step of a generation: each running row samples its next token from `logits`
    /// (`[rows, vocab]`), streams its text through `on_text` (`false` stops every row) and
    /// stops at EOS or the length limit. Returns the tokens to feed next (a stopped row repeats
    /// its last token, ignored), or `None` once every row has stopped.
    pub fn advance(
        &self,
        g: &mut Generation,
        logits: &Tensor,
        on_text: &mut dyn FnMut(usize, &str, &[TokenStep]) -> bool,
    ) -> Result<Option<Vec<u32>>> {
        let eos = &self.tok.eos_ids;
        // Each running row samples its token and computes what its hover shows (two passes
        // over the vocabulary each): in parallel, as the rows are independent.
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let sampled: Vec<Option<Result<Sampled>>> = g
            .samplers
            .par_iter_mut()
            .zip(rows.par_iter())
            .zip(g.stop.par_iter())
            .map(|((sampler, row), stopped)| {
                stopped.is_none().then(|| {
                    let tok = sampler.sample(row)?;
                    Ok((tok, (!eos.contains(&tok)).then(|| self.step(row, tok))))
                })
            })
            .collect();
        let n = g.seqs.len();
        let mut next = Vec::with_capacity(n);
        for (r, sampled) in sampled.into_iter().enumerate() {
            let Some(sampled) = sampled else {
                next.push(*g.seqs[r].last().unwrap_or(&0));
                continue;
            };
            let (tok, token_step) = sampled?;
            next.push(tok);
            let Some(token_step) = token_step else {
                g.stop[r] = Some(StopReason::Eos);
                continue;
            };
            g.gen[r].push(tok);
            g.steps[r].push(token_step);
            // Empty while a partial UTF-8 character waits for its last byte.
            let delta = self.tok.decode_step(&mut g.streams[r], &g.gen[r])?;
            if !delta.is_empty() {
                g.texts[r].push_str(&delta);
                if let Some(last) = g.steps[r].last_mut() {
                    last.text = delta.clone();
                }
                let sent = std::mem::replace(&mut g.unsent[r], g.steps[r].len());
                if !on_text(r, &delta, &g.steps[r][sent..]) {
                    g.stop.iter_mut().for_each(|s| *s = s.or(Some(StopReason::Cancelled)));
                    break;
                }
            }
            if g.step + 1 == g.max_new {
                g.stop[r] = Some(StopReason::Length);
            }
        }
        g.step += 1;
        if g.stop.iter().all(Option::is_some) {
            return Ok(None);
        }
        for (s, &t) in g.seqs.iter_mut().zip(&next) {
            s.push(t);
        }
        Ok(Some(next))
    }

    /// A generation's end: each row's whole answer decoded once, and whatever streaming held
    /// back (a character cut by the length limit) sent last, so the streamed text adds up to the
    /// returned text (for tokenizers whose decoding of more tokens only appends, as byte-level
    /// BPE's does; the web app falls back to the returned text where it would not).
    pub fn finish(&self, mut g: Generation, on_text: &mut dyn FnMut(usize, &str, &[TokenStep]) -> bool) -> Result<Vec<GenOutput>> {
        let n = g.seqs.len();
        for r in 0..n {
            // The answer is the whole sequence decoded once; what streamed is its beginning.
            let streamed = std::mem::replace(&mut g.texts[r], self.tok.decode(&g.gen[r])?).len();
            if g.stop[r] != Some(StopReason::Cancelled) && g.texts[r].len() > streamed && g.texts[r].is_char_boundary(streamed) {
                let tail = &g.texts[r][streamed..];
                if let Some(last) = g.steps[r].last_mut() {
                    last.text.push_str(tail);
                }
                on_text(r, tail, &g.steps[r][g.unsent[r]..]);
            }
        }
        let secs = g.start.elapsed().as_secs_f64().max(1e-9);
        Ok((0..n)
            .map(|r| GenOutput {
                tokens_per_second: g.gen[r].len() as f64 / secs,
                tokens: std::mem::take(&mut g.gen[r]),
                steps: std::mem::take(&mut g.steps[r]),
                text: std::mem::take(&mut g.texts[r]),
                stop: g.stop[r].unwrap_or(StopReason::Length),
            })
            .collect())
    }

    /// What the hover of a generated token shows: its probability under the model (temperature
    /// 1, against the logits' logsumexp) and the most likely tokens at its position.
    /// `text` is filled in by the caller once the token's characters are complete.
    fn step(&self, logits: &[f32], id: u32) -> TokenStep {
        // Two vectorised passes and one of comparisons (a few hundred µs for a 262,144-token
        // vocabulary), where an f64 exp per token and a selection over all of them took 1.4 ms:
        // on a GPU the device waits for this between tokens.
        let lse = crate::vmath::log_sum_exp(logits);
        let prob = |i: usize| (logits[i] as f64 - lse).exp() as f32;
        let top = crate::vmath::top_k(logits, shared::STEP_TOP)
            .into_iter()
            .map(|(logit, i)| TokenProb { id: i, text: self.tok.token_text(i), prob: prob(i as usize), logit })
            .collect();
        TokenStep { id, token: self.tok.token_text(id), text: String::new(), prob: prob(id as usize), top }
    }

    /// p(`target` as the next token after `ids`) with neuron (`layer`, `neuron`) clamped to each
    /// of `values`, plus the unclamped baseline and the neuron's natural activation at the last
    /// position. The prompt's layers below `layer` run once; the values run as one batch.
    pub fn sweep(&self, ids: &[u32], layer: usize, neuron: usize, target: u32, values: &[f32], cancel: &Cancel) -> Result<SweepResult> {
        limits::check_layer_neuron(layer, neuron, self.config())?;
        limits::check_sweep_values(values)?;
        if target as usize >= self.config().vocab_size {
            return Err(Error::bad(format!("target token id {target} is outside the vocabulary")));
        }
        let mut rows = vec![Intervention::none()];
        rows.extend(values.iter().map(|&value| Intervention { clamps: vec![Clamp { layer, neuron, value }] }));
        let t = ids.len();
        let chunk = self.sweep_chunk(t, rows.len());
        let mut probs = Vec::with_capacity(rows.len());
        let mut natural = f32::NAN;
        for (ci, part) in rows.chunks(chunk).enumerate() {
            let mut cache = Cache::with_cancel(self.config(), cancel.clone()).with_room(Room::Scratch);
            let out = self.model.forward(&self.input(ids)?, &mut cache, part, &[layer])?;
            if ci == 0 {
                // Row 0 of the first chunk is the unclamped run.
                natural = out.mlp_acts[0].1.i((0, t - 1, neuron))?.to_scalar::<f32>()?;
            }
            let p = crate::model::softmax(&out.logits)?.i((.., target as usize))?.to_vec1::<f32>()?;
            probs.extend(p);
        }
        Ok(SweepResult { baseline: probs[0], natural_value: natural, probs: probs[1..].to_vec() })
    }

    /// log p(`concept`) after `ids`, once per intervention in `rows`: for alternatives, the log
    /// of their summed next-token probability; for a phrase, the sum of its tokens' log
    /// probabilities, each after the ones before it (teacher forcing, one cached step per token).
    /// Rows run in memory-bounded chunks; within a chunk the prompt's layers below the first
    /// clamped one run once.
    pub fn concept_logprobs(&self, ids: &[u32], concept: &crate::analysis::ConceptIds, rows: &[Intervention], cancel: &Cancel) -> Result<Vec<f64>> {
        let target = &concept.ids;
        if target.is_empty() || target.iter().any(|&t| t as usize >= self.config().vocab_size) {
            return Err(Error::bad("the concept's tokens must be in the vocabulary"));
        }
        let steps = concept.steps();
        limits::check_prompt_tokens(ids.len(), steps, self.config().max_seq_len)?;
        let chunk = self.sweep_chunk(ids.len() + steps, rows.len());
        let dev = self.model.device();
        // The columns read at each step: the phrase's tokens one by one, or all alternatives at
        // once. Only they leave the device.
        let groups: Vec<Vec<u32>> = if concept.phrase { target.iter().map(|&t| vec![t]).collect() } else { vec![target.clone()] };
        let mut out = Vec::with_capacity(rows.len());
        for part in rows.chunks(chunk) {
            let mut cache = Cache::with_cancel(self.config(), cancel.clone()).with_room(Room::Positions(ids.len() + steps));
            // Rows are judged one by one: an extreme clamp that overflows gives that row -inf,
            // not an error for the whole batch.
            let mut logits = self.model.forward_rows(&self.input(ids)?, &mut cache, part, &[])?.logits;
            let mut lp = vec![0f64; part.len()];
            for (step, cols) in groups.iter().enumerate() {
                let logp: Vec<Vec<f32>> =
                    candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?.index_select(&Tensor::new(cols.as_slice(), dev)?, 1)?.to_vec2()?;
                for (acc, row) in lp.iter_mut().zip(&logp) {
                    let m = row.iter().map(|&x| x as f64).fold(f64::NEG_INFINITY, f64::max);
                    let v = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    *acc += if v.is_finite() { v } else { f64::NEG_INFINITY };
                }
                if step + 1 < groups.len() {
                    let input = Tensor::from_vec(vec![cols[0]; part.len()], (part.len(), 1), dev)?;
                    logits = self.model.forward_rows(&input, &mut cache, part, &[])?.logits;
                }
            }
            out.extend(lp.into_iter().map(|v| if v.is_nan() { f64::NEG_INFINITY } else { v }));
        }
        Ok(out)
    }

    /// Estimated work of [`Engine::concept_logprobs`]: a prompt of `t` tokens and `steps` scored
    /// tokens for `rows` rows that split at layer `expand_at`.
    pub fn concept_cost(&self, t: usize, steps: usize, rows: usize, expand_at: usize) -> f64 {
        let chunk = self.sweep_chunk(t + steps, rows);
        (0..rows)
            .step_by(chunk)
            .map(|start| {
                let r = chunk.min(rows - start);
                self.forward_cost(t, 0, r, expand_at) + (1..steps).map(|s| self.forward_cost(1, t + s - 1, r, 0)).sum::<f64>()
            })
            .sum()
    }

    /// Estimated work of one forward pass, in FLOP-equivalents: over `t` new positions with
    /// `past` positions cached, with `rows` batch rows from layer `expand_at` on (one row below
    /// it), and the LM head on the last position of each row. It counts what this implementation
    /// does: the weights' multiply-adds and the attention's query × key pairs (each query
    /// against every key, but a long prompt's blocks of queries stop at their own last position,
    /// and a sliding-window layer's start at their window: [`crate::model::common::attention_pairs`]), plus
    /// [`STREAM_FLOPS_PER_BYTE`] for every byte it streams through memory: every weight once per
    /// pass, and the key/value cache it reads, extends and repeats for grouped heads. The second
    /// term is what a decoding step costs on a CPU, where it reads every weight for a few FLOPs.
    pub fn forward_cost(&self, t: usize, past: usize, rows: usize, expand_at: usize) -> f64 {
        let c = self.config();
        let (d, q, kv) = (c.d_model as f64, (c.n_heads * c.head_dim) as f64, (c.n_kv_heads * c.head_dim) as f64);
        let per_token = 2.0 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * c.d_ff as f64);
        // A Gemma local layer's attention reads only its window.
        let window = |l: usize| c.arch.gemma().filter(|p| !p.is_global(l)).map(|p| p.sliding_window);
        let layer_flops = |l: usize| t as f64 * per_token + 4.0 * q * crate::model::common::attention_pairs(t, past, window(l)) as f64;
        let rows_at = |l: usize| if l < expand_at { 1.0 } else { rows as f64 };
        let ctx = (past + t) as f64;
        let layer_rows: f64 = (0..c.n_layers).map(rows_at).sum();
        let flops = (0..c.n_layers).map(|l| rows_at(l) * layer_flops(l)).sum::<f64>() + rows as f64 * 2.0 * d * c.vocab_size as f64;
        let elem = self.model.dtype().size_in_bytes() as f64;
        let cache_bytes = layer_rows * (4.0 * kv + 2.0 * q) * ctx * elem;
        flops + STREAM_FLOPS_PER_BYTE * (self.weight_bytes as f64 + cache_bytes)
    }

    /// Estimated work of a generation: the prompt once (split into the variants at the first
    /// clamped layer), then every new token for every variant.
    pub fn generate_cost(&self, prompt_tokens: usize, variants: &[Intervention], max_new: usize) -> f64 {
        let rows = variants.len().max(1);
        let expand_at = if rows > 1 { first_clamped_layer(variants).unwrap_or(self.config().n_layers) } else { 0 };
        let prefill = self.forward_cost(prompt_tokens, 0, rows, expand_at);
        let steps: f64 = (0..max_new).map(|s| self.forward_cost(1, prompt_tokens + s, rows, 0)).sum();
        prefill + steps
    }

    /// Estimated work of a clamp sweep: the unclamped row and one row per value, in the chunks
    /// [`Engine::sweep`] runs (each chunk recomputes the layers below the clamped one).
    pub fn sweep_cost(&self, prompt_tokens: usize, layer: usize, values: usize) -> f64 {
        let rows = values + 1;
        let chunk = self.sweep_chunk(prompt_tokens, rows);
        (0..rows).step_by(chunk).map(|start| self.forward_cost(prompt_tokens, 0, chunk.min(rows - start), layer)).sum()
    }

    /// Rows per forward pass of a sweep: the attention scores of one batch (rows × heads × t × t
    /// floats, or a block of queries × t for a long prompt), its MLP activations and its last
    /// position's logits (three vocabulary-sized copies: logits, softmax, one more on the way)
    /// bounded to ~256 MB.
    fn sweep_chunk(&self, t: usize, rows: usize) -> usize {
        let c = self.config();
        let per_row = 4 * c.n_heads * crate::model::common::score_rows(t) * t + 4 * t * c.d_ff * 2 + 4 * c.vocab_size * 3;
        (256usize << 20).checked_div(per_row).unwrap_or(rows).clamp(2, rows.max(2))
    }

    /// A generate request checked and turned into prompt ids and its variants (cheap:
    /// tokenization only): everything it can fail on before it runs.
    /// A generate request's prompt and batch rows: each sample's variants (normal and steered
    /// with `compare`), with the sample's seed and what each row is.
    #[allow(clippy::type_complexity)]
    pub(crate) fn prepare_generate(&self, req: &GenerateRequest) -> Result<(Vec<u32>, Vec<Intervention>, Vec<u64>, Vec<(usize, Variant)>)> {
        let ids = self.prompt_ids(&req.prompt)?;
        let steered = self.intervention(&req.clamps)?;
        if req.compare && steered.is_empty() {
            return Err(Error::bad("compare needs at least one clamp"));
        }
        if !(1..=shared::limits::MAX_SAMPLES).contains(&req.samples) {
            return Err(Error::bad(format!("samples must be between 1 and {}", shared::limits::MAX_SAMPLES)));
        }
        limits::check_sampling(req.sampling.temperature, req.sampling.top_p, req.sampling.max_new_tokens)?;
        limits::check_prompt_tokens(ids.len(), req.sampling.max_new_tokens, self.config().max_seq_len)?;
        let kinds: Vec<(Intervention, Variant)> = if req.compare {
            vec![(Intervention::none(), Variant::Normal), (steered, Variant::Steered)]
        } else if steered.is_empty() {
            vec![(steered, Variant::Normal)]
        } else {
            vec![(steered, Variant::Steered)]
        };
        let (mut rows, mut seeds, mut what) = (Vec::new(), Vec::new(), Vec::new());
        for s in 0..req.samples {
            for (iv, v) in &kinds {
                rows.push(iv.clone());
                seeds.push(req.sampling.seed.wrapping_add(s as u64));
                what.push((s, *v));
            }
        }
        Ok((ids, rows, seeds, what))
    }

    /// Validate a generate request without running it; its estimated work ([`Engine::forward_cost`]).
    pub fn generate_work(&self, req: &GenerateRequest) -> Result<f64> {
        let (ids, rows, _, _) = self.prepare_generate(req)?;
        Ok(self.generate_cost(ids.len(), &rows, req.sampling.max_new_tokens))
    }

    /// Validate a sweep request without running it; its estimated work.
    pub fn sweep_work(&self, req: &SweepRequest) -> Result<f64> {
        let ids = self.prompt_ids(&req.prompt)?;
        self.tok.single_token(&req.target)?;
        limits::check_layer_neuron(req.layer, req.neuron, self.config())?;
        limits::check_sweep_values(&req.values)?;
        Ok(self.sweep_cost(ids.len(), req.layer, req.values.len()))
    }

    /// Validate a next-token request without running it; its estimated work.
    pub fn next_token_work(&self, req: &NextTokenRequest) -> Result<f64> {
        let ids = self.prompt_ids(&req.prompt)?;
        self.intervention(&req.clamps)?;
        limits::check_top_k(req.top_k)?;
        Ok(self.forward_cost(ids.len(), 0, 1, 0))
    }

    /// Run a `shared::GenerateRequest`: validation, prompt, the samples' one or two variants
    /// each, as one batch, streaming. `on_text(sample, variant, text, steps)` returns false to
    /// cancel.
    #[allow(clippy::type_complexity)]
    pub fn generate_request(
        &self,
        req: &GenerateRequest,
        cancel: &Cancel,
        on_text: &mut dyn FnMut(usize, Variant, &str, &[TokenStep]) -> bool,
    ) -> Result<GenerateResponse> {
        let (ids, rows, seeds, what) = self.prepare_generate(req)?;
        let outs = self.generate_rows(&ids, &rows, &seeds, &req.sampling, true, cancel, &mut |r, t, s| on_text(what[r].0, what[r].1, t, s))?;
        Ok(GenerateResponse { prompt_tokens: ids.len(), completions: Self::completions(outs, &what) })
    }

    /// Run a `shared::NextTokenRequest`.
    pub fn next_token_request(&self, req: &NextTokenRequest, cancel: &Cancel) -> Result<NextTokenResponse> {
        let ids = self.prompt_ids(&req.prompt)?;
        let iv = self.intervention(&req.clamps)?;
        Ok(NextTokenResponse { prompt_tokens: ids.len(), top: self.next_token(&ids, &iv, req.top_k, cancel)? })
    }

    /// Run a `shared::SweepRequest`.
    pub fn sweep_request(&self, req: &SweepRequest, cancel: &Cancel) -> Result<SweepResponse> {
        let ids = self.prompt_ids(&req.prompt)?;
        let target = self.tok.single_token(&req.target)?;
        let r = self.sweep(&ids, req.layer, req.neuron, target, &req.values, cancel)?;
        Ok(SweepResponse {
            target_id: target,
            target_text: self.tok.token_text(target),
            baseline: r.baseline,
            natural_value: r.natural_value,
            points: req.values.iter().zip(&r.probs).map(|(&value, &prob)| SweepPoint { value, prob }).collect(),
        })
    }

    /// Turn generation outputs into the shared message type, one variant kind per output.
    pub(crate) fn completions(outs: Vec<GenOutput>, what: &[(usize, Variant)]) -> Vec<Completion> {
        outs.into_iter()
            .zip(what)
            .map(|(o, &(sample, variant))| Completion {
                sample,
                variant,
                text: o.text,
                token_ids: o.tokens,
                steps: o.steps,
                stop: o.stop,
                tokens_per_second: o.tokens_per_second,
            })
            .collect()
    }
}

/// What streaming one byte through memory costs, in FLOPs, for the work estimates: measured on
/// this project's 2-core machine, which does ~40 GFLOP/s in batched f32 products but streams
/// ~7.5 GB/s (a 512-token compare generation: 53 s measured, 58 s estimated).
pub const STREAM_FLOPS_PER_BYTE: f64 = 6.0;

/// The lowest layer any of `variants` clamps.
fn first_clamped_layer(variants: &[Intervention]) -> Option<usize> {
    variants.iter().flat_map(|iv| iv.clamps.iter().map(|c| c.layer)).min()
}

/// Indices of the `k` largest values, largest first (ties: the lower index first).
pub fn top_indices(xs: &[f32], k: usize) -> Vec<usize> {
    crate::vmath::top_k(xs, k).into_iter().map(|(_, i)| i as usize).collect()
}

/// Gemma 2's or 3's additions from a Hugging Face config.json (`gemma2`, `gemma3_text`). The
/// layer pattern is `sliding_window_pattern`, or read from `layer_types` (newer transformers), or
/// the family's (`default_pattern`: 2 for Gemma 2, 6 for Gemma 3). Gemma 2 has one RoPE base.
fn gemma_params(json: &serde_json::Value, default_pattern: usize) -> std::result::Result<Gemma3Params, String> {
    let num = |k: &str| json[k].as_f64();
    let pattern = match (json["sliding_window_pattern"].as_u64(), json["layer_types"].as_array()) {
        (Some(p), _) => p as usize,
        (None, Some(types)) => {
            let global: Vec<bool> = types.iter().map(|t| t.as_str() == Some("full_attention")).collect();
            let p = global.iter().position(|&g| g).map_or(global.len() + 1, |i| i + 1);
            if global.iter().enumerate().any(|(l, &g)| g != (l + 1).is_multiple_of(p)) {
                return Err("layer_types do not follow a fixed local/global pattern".into());
            }
            p
        }
        (None, None) => default_pattern,
    };
    let global_rope_factor = match &json["rope_scaling"] {
        serde_json::Value::Null => 1.0,
        s if s["rope_type"].as_str().or(s["type"].as_str()) == Some("linear") => s["factor"].as_f64().ok_or("rope_scaling has no factor")? as f32,
        s => return Err(format!("rope_scaling {s} is not supported for Gemma 3 (only linear)")),
    };
    let activation = json["hidden_activation"].as_str().or(json["hidden_act"].as_str()).unwrap_or("gelu_pytorch_tanh");
    if activation != "gelu_pytorch_tanh" {
        return Err(format!("hidden_activation {activation:?} is not supported (only gelu_pytorch_tanh)"));
    }
    Ok(Gemma3Params {
        sliding_window: json["sliding_window"].as_u64().ok_or("missing sliding_window")? as usize,
        pattern,
        // Gemma 2's local layers use its one base; Gemma 3's default local base is 10,000.
        rope_local_theta: num("rope_local_base_freq").or(if default_pattern == 2 { num("rope_theta") } else { None }).unwrap_or(10_000.0) as f32,
        query_pre_attn_scalar: num("query_pre_attn_scalar").ok_or("missing query_pre_attn_scalar")? as f32,
        final_logit_softcap: num("final_logit_softcapping").map(|c| c as f32),
        attn_logit_softcap: num("attn_logit_softcapping").map(|c| c as f32),
        global_rope_factor,
    })
}
