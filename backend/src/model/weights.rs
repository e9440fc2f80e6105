//! Where weights come from: a GGUF file or a Hugging Face safetensors directory. Both implement
//! [`WeightSource`], addressed by [`Key`], so the model code never sees file-format names.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::common::Linear;
use crate::error::{Error, Result};

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// Decided per file when it is opened ([`WeightMode::auto`]): f32 for small models, the
    /// file's own precision for large ones.
    Auto,
    /// Dequantize everything to this dtype (F32 by default: reference-grade numerics).
    Dense(DType),
    /// Keep GGUF quantized weights and use candle's quantized matmuls (activations are
    /// quantized to 8 bits on the fly, as llama.cpp does): less memory, different numerics.
    Quantized,
    /// Keep GGUF quantized weights as they are and multiply them with f32 activations
    /// ([`super::exact::ExactLinear`], CPU only): the f32 path's numbers up to summation order,
    /// at the quantized file's memory traffic.
    Exact,
}

/// Models with at most this many parameters are held in f32 by default (4 GB): reference
/// numerics where they are cheap, as for both default models.
pub const AUTO_F32_PARAMS: u64 = 1_000_000_000;

impl WeightMode {
    pub fn compute_dtype(&self) -> DType {
        match self {
            WeightMode::Dense(d) => *d,
            WeightMode::Quantized | WeightMode::Exact | WeightMode::Auto => DType::F32,
        }
    }

    /// What `Auto` means for a file of `params` parameters whose weights are stored as `stored`
    /// (`None`: quantized) on the CPU or not: a quantized GGUF on the CPU keeps its blocks and
    /// multiplies them exactly ([`WeightMode::Exact`]: the f32 numbers at the file's size).
    /// Otherwise f32 up to [`AUTO_F32_PARAMS`]; beyond, the file's precision (f32, f16 or bf16),
    /// and bf16 for a quantized GGUF (2 bytes a weight, exact for the f32 activations;
    /// `Quantized` keeps the blocks but quantizes activations, so it stays a choice). Other modes
    /// are what they say.
    pub fn auto(self, params: u64, stored: Option<DType>, cpu: bool) -> WeightMode {
        match self {
            WeightMode::Auto if stored.is_none() && cpu => WeightMode::Exact,
            WeightMode::Auto if params <= AUTO_F32_PARAMS => WeightMode::Dense(DType::F32),
            WeightMode::Auto => WeightMode::Dense(stored.filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16)).unwrap_or(DType::BF16)),
            m => m,
        }
    }

    /// For people: "exact", "quantized", "f32", "f16", "bf16" (or "auto" before a file decides).
    pub fn name(&self) -> String {
        match self {
            WeightMode::Auto => "auto".into(),
            WeightMode::Exact => "exact".into(),
            m => m.desc(),
        }
    }

    /// As recorded in map caches: "f32", "f16", "bf16" or "quantized".
    pub fn desc(&self) -> String {
        match self {
            WeightMode::Quantized => "quantized".into(),
            // The same weight values as f32 (a map built from either is the same map).
            WeightMode::Exact => "f32".into(),
            m => format!("{:?}", m.compute_dtype()).to_lowercase(),
        }
    }
}

/// The dtype most of `tensors`' parameters are stored in (`None` for a quantized type), and
/// their total count.
fn census(tensors: impl Iterator<Item = (u64, Option<DType>)>) -> (u64, Option<DType>) {
    let mut by: Vec<(Option<DType>, u64)> = Vec::new();
    for (n, d) in tensors {
        match by.iter_mut().find(|(x, _)| *x == d) {
            Some((_, c)) => *c += n,
            None => by.push((d, n)),
        }
    }
    let total = by.iter().map(|(_, n)| n).sum();
    (total, by.into_iter().max_by_key(|(_, n)| *n).and_then(|(d, _)| d))
}

/// A weight of a model, independent of file naming (the Llama set, and the norms Gemma adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Embed,
    OutNorm,
    Output,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    FfnNorm(usize),
    /// Qwen2: biases of the Q, K and V projections.
    QBias(usize),
    KBias(usize),
    VBias(usize),
    /// Gemma and Qwen3: per-head RMSNorm of queries and keys, `[head_dim]`.
    QNorm(usize),
    KNorm(usize),
    /// Gemma: RMSNorm of the attention output and of the MLP output, before the residual add.
    PostAttnNorm(usize),
    PostFfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl Key {
    /// The shape the model's configuration implies (`[out, in]` for linear layers).
    pub fn shape(&self, c: &super::Config) -> Vec<usize> {
        let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        match self {
            Key::Embed | Key::Output => vec![c.vocab_size, c.d_model],
            Key::OutNorm | Key::AttnNorm(_) | Key::FfnNorm(_) | Key::PostAttnNorm(_) | Key::PostFfnNorm(_) => vec![c.d_model],
            Key::QNorm(_) | Key::KNorm(_) => vec![c.head_dim],
            Key::QBias(_) => vec![q],
            Key::KBias(_) | Key::VBias(_) => vec![kv],
            Key::Q(_) => vec![q, c.d_model],
            Key::K(_) | Key::V(_) => vec![kv, c.d_model],
            Key::O(_) => vec![c.d_model, q],
            Key::Gate(_) | Key::Up(_) => vec![c.d_ff, c.d_model],
            Key::Down(_) => vec![c.d_model, c.d_ff],
        }
    }

    pub fn gguf_name(&self) -> String {
        match self {
            Key::Embed => "token_embd.weight".into(),
            Key::OutNorm => "output_norm.weight".into(),
            Key::Output => "output.weight".into(),
            Key::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Key::Q(l) => format!("blk.{l}.attn_q.weight"),
            Key::K(l) => format!("blk.{l}.attn_k.weight"),
            Key::V(l) => format!("blk.{l}.attn_v.weight"),
            Key::O(l) => format!("blk.{l}.attn_output.weight"),
            Key::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Key::QNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
            Key::QBias(l) => format!("blk.{l}.attn_q.bias"),
            Key::KBias(l) => format!("blk.{l}.attn_k.bias"),
            Key::VBias(l) => format!("blk.{l}.attn_v.bias"),
            Key::KNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
            Key::PostAttnNorm(l) => format!("blk.{l}.post_attention_norm.weight"),
            Key::PostFfnNorm(l) => format!("blk.{l}.post_ffw_norm.weight"),
            Key::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Key::Up(l) => format!("blk.{l}.ffn_up.weight"),
            Key::Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }
    /// The Hugging Face name. Gemma calls the pre-MLP norm `pre_feedforward_layernorm` and uses
    /// Llama's name for it, `post_attention_layernorm`, for the norm after attention.
    pub fn hf_name(&self, gemma: bool) -> String {
        match self {
            Key::FfnNorm(l) if gemma => format!("model.layers.{l}.pre_feedforward_layernorm.weight"),
            Key::PostAttnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Key::PostFfnNorm(l) => format!("model.layers.{l}.post_feedforward_layernorm.weight"),
            Key::QNorm(l) => format!("model.layers.{l}.self_attn.q_norm.weight"),
            Key::QBias(l) => format!("model.layers.{l}.self_attn.q_proj.bias"),
            Key::KBias(l) => format!("model.layers.{l}.self_attn.k_proj.bias"),
            Key::VBias(l) => format!("model.layers.{l}.self_attn.v_proj.bias"),
            Key::KNorm(l) => format!("model.layers.{l}.self_attn.k_norm.weight"),
            Key::Embed => "model.embed_tokens.weight".into(),
            Key::OutNorm => "model.norm.weight".into(),
            Key::Output => "lm_head.weight".into(),
            Key::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Key::Q(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            Key::K(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            Key::V(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            Key::O(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            Key::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Key::Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            Key::Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            Key::Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
        }
    }
}

/// candle's GGUF parser, with its panics on malformed headers (e.g. `general.alignment = 0`
/// divides by zero in candle 0.11) turned into errors, and their panic message kept off stderr.
fn read_gguf(reader: &mut BufReader<File>) -> std::result::Result<gguf_file::Content, String> {
    thread_local!(static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(reader)));
    QUIET.with(|q| q.set(false));
    match r {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("its header is malformed".into()),
    }
}

/// Refuse a weight with NaN or infinite values (a corrupt file): otherwise the model would load and
/// answer NaN probabilities.
fn check_finite(t: &Tensor, name: &str, path: &Path) -> Result<()> {
    if !super::common::all_finite(t)? {
        return Err(Error::model(path, format!("tensor {name} has NaN or infinite values: the file is corrupt")));
    }
    Ok(())
}

pub trait WeightSource {
    fn device(&self) -> &Device;
    /// The file or directory the weights come from (for error messages).
    fn origin(&self) -> &Path;
    /// The weight's name in this format (for error messages).
    fn name(&self, key: Key) -> String;
    /// A weight used as a linear layer `[out, in]`.
    fn linear(&self, key: Key) -> Result<Linear>;
    /// A weight as a dense tensor in the compute dtype.
    fn dense(&self, key: Key) -> Result<Tensor>;
    /// A norm weight, in the compute dtype.
    fn vector(&self, key: Key) -> Result<Tensor> {
        self.dense(key)
    }
    /// The LM head when tied to the embedding, `embed` (the dense embedding already loaded): the
    /// same tensor, not a second copy, unless the head is kept quantized.
    fn tied_head(&self, embed: &Tensor) -> Result<Linear> {
        Ok(Linear::Candle(QMatMul::Tensor(embed.clone())))
    }
    fn has(&self, key: Key) -> bool;
    /// How the weights are held (never `Auto`: decided when the file was opened).
    fn mode(&self) -> WeightMode;
}

/// Weights read from a GGUF file.
pub struct GgufSource {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: RefCell<BufReader<File>>,
    device: Device,
    mode: WeightMode,
}

impl GgufSource {
    /// Open a GGUF file and check that every tensor lies inside it (a truncated file fails here,
    /// with a clear message, not later). `WeightMode::Auto` is decided here.
    pub fn open(path: &Path, device: &Device, mode: WeightMode) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::model(path, e))?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = read_gguf(&mut reader).map_err(|e| Error::model(path, format!("not a readable GGUF file ({e})")))?;
        for (name, info) in &content.tensor_infos {
            // Checked arithmetic: a corrupt shape or offset must be an error, not an overflow.
            let (block, dims) = (info.ggml_dtype.block_size() as u64, info.shape.dims());
            let elems = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            let end = elems
                .filter(|e| e.is_multiple_of(block))
                .and_then(|e| (e / block).checked_mul(info.ggml_dtype.type_size() as u64))
                .and_then(|bytes| content.tensor_data_offset.checked_add(info.offset)?.checked_add(bytes));
            let Some(end) = end else {
                return Err(Error::model(path, format!("tensor {name} has an impossible size (shape {dims:?}, offset {})", info.offset)));
            };
            if end > file_len {
                return Err(Error::model(path, format!("truncated: tensor {name} ends at byte {end}, file has {file_len}")));
            }
        }
        let (params, stored) = census(content.tensor_infos.values().map(|t| {
            let d = match t.ggml_dtype {
                GgmlDType::F32 => Some(DType::F32),
                GgmlDType::F16 => Some(DType::F16),
                GgmlDType::BF16 => Some(DType::BF16),
                _ => None,
            };
            (t.shape.elem_count() as u64, d)
        }));
        let mode = mode.auto(params, stored, device.is_cpu());
        if mode == WeightMode::Exact && !device.is_cpu() {
            return Err(Error::bad("--weights exact runs on the CPU; on a GPU use f32, f16 or bf16"));
        }
        Ok(Self { path: path.to_owned(), content, reader: RefCell::new(reader), device: device.clone(), mode })
    }

    /// A tensor as stored in the file, by its GGUF name.
    fn read(&self, name: &str) -> Result<QTensor> {
        self.content.tensor(&mut *self.reader.borrow_mut(), name, &self.device).map_err(|e| Error::model(&self.path, format!("reading {name}: {e}")))
    }

    /// A quantized weight kept exact: its blocks, checked to be finite a row at a time (no f32
    /// copy of the weight, even for a moment). `None` when the weight is not of a block type.
    fn exact(&self, key: Key) -> Result<Option<Linear>> {
        let name = key.gguf_name();
        let Some(info) = self.content.tensor_infos.get(&name) else {
            return Err(Error::model(&self.path, format!("missing tensor {name}")));
        };
        if !super::exact::supported(info.ggml_dtype) {
            return Ok(None);
        }
        let (rows, cols) = match info.shape.dims() {
            &[rows, cols] => (rows, cols),
            dims => return Err(Error::model(&self.path, format!("tensor {name} has shape {dims:?}, not a matrix"))),
        };
        let w = {
            let mut r = self.reader.borrow_mut();
            r.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
            super::exact::ExactLinear::read(info.ggml_dtype, rows, cols, &mut *r)
                .map_err(|e| Error::model(&self.path, format!("reading {name}: {e}")))?
        };
        if !w.all_finite() {
            return Err(Error::model(&self.path, format!("tensor {name} has NaN or infinite values: the file is corrupt")));
        }
        Ok(Some(Linear::Exact(Arc::new(w))))
    }

    /// A tensor as stored, and dequantized to f32 and checked to be finite (read and dequantized
    /// once: the f32 copy is what a dense load keeps).
    fn qtensor(&self, key: Key) -> Result<(QTensor, Tensor)> {
        let name = key.gguf_name();
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(Error::model(&self.path, format!("missing tensor {name}")));
        }
        let q = self.read(&name)?;
        let f = q.dequantize(&self.device)?;
        check_finite(&f, &name, &self.path)?;
        Ok((q, f))
    }

    /// Read a tensor by its GGUF name, dequantized to f32 (e.g. `rope_freqs.weight`).
    pub fn raw_f32(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = self.read(name)?;
        let t = q.dequantize(&self.device)?;
        check_finite(&t, name, &self.path)?;
        Ok(Some(t))
    }

    fn to_linear(&self, (q, f): (QTensor, Tensor)) -> Result<Linear> {
        Ok(match (self.mode, q.dtype()) {
            (WeightMode::Quantized, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => Linear::Candle(QMatMul::Tensor(f)),
            (WeightMode::Quantized, _) => Linear::Candle(QMatMul::QTensor(Arc::new(q))),
            (mode, _) => Linear::Candle(QMatMul::Tensor(f.to_dtype(mode.compute_dtype())?)),
        })
    }
}

impl WeightSource for GgufSource {
    fn device(&self) -> &Device {
        &self.device
    }
    fn origin(&self) -> &Path {
        &self.path
    }
    fn name(&self, key: Key) -> String {
        key.gguf_name()
    }
    fn linear(&self, key: Key) -> Result<Linear> {
        if self.mode == WeightMode::Exact {
            if let Some(w) = self.exact(key)? {
                return Ok(w);
            }
        }
        self.to_linear(self.qtensor(key)?)
    }
    fn dense(&self, key: Key) -> Result<Tensor> {
        Ok(self.qtensor(key)?.1.to_dtype(self.mode.compute_dtype())?)
    }
    fn tied_head(&self, embed: &Tensor) -> Result<Linear> {
        let quantized = self
            .content
            .tensor_infos
            .get(&Key::Embed.gguf_name())
            .is_some_and(|t| !matches!(t.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
        if self.mode == WeightMode::Quantized && quantized {
            return self.to_linear(self.qtensor(Key::Embed)?);
        }
        Ok(Linear::Candle(QMatMul::Tensor(embed.clone())))
    }
    fn has(&self, key: Key) -> bool {
        self.content.tensor_infos.contains_key(&key.gguf_name())
    }
    fn mode(&self) -> WeightMode {
        self.mode
    }
}

/// Weights read from one or several `*.safetensors` files (Hugging Face layout). Each tensor is
/// read with a positioned read when it is asked for, not memory-mapped: a mapping's touched pages
/// would stay resident (and counted) until the whole file is closed, so an 8B model's map or
/// load would hold the file twice.
pub struct SafetensorsSource {
    files: Vec<File>,
    tensors: HashMap<String, StEntry>,
    /// Gemma's names, and its norms stored as `w` for a scale of `1 + w`.
    gemma: bool,
    dir: PathBuf,
    device: Device,
    mode: WeightMode,
}

/// Where one tensor lies: its file, dtype, shape and the offset of its first byte.
#[derive(Debug, Clone)]
struct StEntry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
}

/// The tensors a safetensors file holds, from its header, each checked to lie inside the file
/// with the size its shape implies.
fn read_header(file: &File, path: &Path, index: usize) -> Result<Vec<(String, StEntry)>> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let bad = |m: String| Error::model(path, format!("not a readable safetensors file ({m})"));
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0).map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(format!("header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (name, info) in header.into_iter().filter(|(k, _)| k != "__metadata__") {
        let dtype = match info["dtype"].as_str() {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            other => return Err(Error::model(path, format!("tensor {name} has dtype {other:?} (supported: F32, F16, BF16, F64)"))),
        };
        let shape: Option<Vec<usize>> = info["shape"].as_array().and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
        let offsets: Option<Vec<u64>> = info["data_offsets"].as_array().and_then(|a| a.iter().map(|x| x.as_u64()).collect());
        let (Some(shape), Some([begin, end])) = (shape, offsets.as_deref().and_then(|o| <[u64; 2]>::try_from(o).ok())) else {
            return Err(bad(format!("tensor {name} has no shape or offsets")));
        };
        let bytes = shape.iter().try_fold(dtype.size_in_bytes() as u64, |a, &d| a.checked_mul(d as u64));
        let (start, stop) = ((8 + n).checked_add(begin), (8 + n).checked_add(end));
        let (Some(start), Some(stop)) = (start, stop) else {
            return Err(bad(format!("tensor {name} has impossible offsets")));
        };
        if bytes != end.checked_sub(begin) || stop > len {
            return Err(Error::model(path, format!("tensor {name}: its bytes {begin}..{end} do not fit its shape {shape:?} or the file")));
        }
        out.push((name, StEntry { file: index, dtype, shape, start }));
    }
    Ok(out)
}

/// Read a tensor's values straight into the vector that becomes its storage (no second copy).
fn read_typed<T: candle_core::WithDType>(file: &File, e: &StEntry, device: &Device) -> std::result::Result<Tensor, String> {
    use std::os::unix::fs::FileExt;
    let n: usize = e.shape.iter().product();
    let mut v = vec![T::from_f64(0.0); n];
    // SAFETY: the bytes of `v` are exactly n values of a plain float type, for which every bit
    // pattern is a valid value; safetensors stores them little-endian, as the targets we build
    // for (x86-64, aarch64) hold them.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
    file.read_exact_at(bytes, e.start).map_err(|err| err.to_string())?;
    let t = Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu).map_err(|err| err.to_string())?;
    t.to_device(device).map_err(|err| err.to_string())
}

impl SafetensorsSource {
    /// Open the `*.safetensors` of `dir`; `gemma` for a Gemma checkpoint (its names, its norms).
    /// `WeightMode::Auto` is decided here.
    pub fn open(dir: &Path, device: &Device, mode: WeightMode, gemma: bool) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::model(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::model(dir, "no *.safetensors files"));
        }
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let f = File::open(p).map_err(|e| Error::model(p, e))?;
            tensors.extend(read_header(&f, p, i)?);
            files.push(f);
        }
        let (params, stored) = census(tensors.values().map(|t| (t.shape.iter().product::<usize>() as u64, Some(t.dtype))));
        let mode = mode.auto(params, stored, device.is_cpu());
        Ok(Self { files, tensors, gemma, dir: dir.to_owned(), device: device.clone(), mode })
    }

    fn load(&self, key: Key) -> Result<Tensor> {
        let name = key.hf_name(self.gemma);
        let Some(e) = self.tensors.get(&name) else {
            return Err(Error::model(&self.dir, format!("missing tensor {name}")));
        };
        let file = &self.files[e.file];
        let t = match e.dtype {
            DType::F32 => read_typed::<f32>(file, e, &self.device),
            DType::F16 => read_typed::<half::f16>(file, e, &self.device),
            DType::BF16 => read_typed::<half::bf16>(file, e, &self.device),
            _ => read_typed::<f64>(file, e, &self.device),
        }
        .map_err(|err| Error::model(&self.dir, format!("reading {name}: {err}")))?;
        check_finite(&t, &name, &self.dir)?;
        Ok(t.to_dtype(self.mode.compute_dtype())?)
    }
}

impl WeightSource for SafetensorsSource {
    fn device(&self) -> &Device {
        &self.device
    }
    fn origin(&self) -> &Path {
        &self.dir
    }
    fn name(&self, key: Key) -> String {
        key.hf_name(self.gemma)
    }
    fn linear(&self, key: Key) -> Result<Linear> {
        let t = self.load(key)?;
        Ok(Linear::Candle(match self.mode {
            // Safetensors have no blocks to keep: exact is plain f32.
            WeightMode::Dense(_) | WeightMode::Exact | WeightMode::Auto => QMatMul::Tensor(t),
            WeightMode::Quantized => QMatMul::QTensor(Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0)?)),
        }))
    }
    fn dense(&self, key: Key) -> Result<Tensor> {
        self.load(key)
    }
    /// Gemma's checkpoints store a norm as `w` and scale by `1 + w` (llama.cpp adds the 1 when it
    /// writes a GGUF): every source hands out the scale itself.
    fn vector(&self, key: Key) -> Result<Tensor> {
        let w = self.load(key)?;
        Ok(if self.gemma { (w + 1.0)? } else { w })
    }
    fn has(&self, key: Key) -> bool {
        self.tensors.contains_key(&key.hf_name(self.gemma))
    }
    fn mode(&self) -> WeightMode {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_quantized_blocks_exact_on_the_cpu_only() {
        let (small, large) = (135_000_000, 8_000_000_000);
        for params in [small, large] {
            assert_eq!(WeightMode::Auto.auto(params, None, true), WeightMode::Exact);
        }
        assert_eq!(WeightMode::Auto.auto(small, None, false), WeightMode::Dense(DType::F32));
        assert_eq!(WeightMode::Auto.auto(large, None, false), WeightMode::Dense(DType::BF16));
        assert_eq!(WeightMode::Auto.auto(large, Some(DType::F16), true), WeightMode::Dense(DType::F16));
        assert_eq!(WeightMode::Auto.auto(small, Some(DType::BF16), true), WeightMode::Dense(DType::F32));
        assert_eq!(WeightMode::Quantized.auto(small, None, true), WeightMode::Quantized);
        assert_eq!(WeightMode::Exact.desc(), WeightMode::Dense(DType::F32).desc(), "exact and f32 maps are the same map");
    }
}
