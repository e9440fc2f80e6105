//! A decoding step's small ops fused, for the GPU: a Llama block's step is ~22 candle ops (each
//! its own kernel launch, allocation and host dispatch) and becomes 9 with the Q·K·V and gate·up
//! weights stacked (one product each) and four kernels (`kernels/decode.cu`): RoPE of the queries
//! and keys with the keys and values written into the cache, single-query attention over the
//! cache, the residual add with the norm after it (the MLP's, or the next block's), and
//! SiLU(gate)·up. A step costs the host some microseconds per launch, several hundred times per
//! token: by our estimate (the next GPU run measures it) what keeps decoding below the
//! memory-bandwidth bound.
//!
//! Opt-in while it waits for a GPU run to compare it with the plain path:
//! `FLASH_INTERP_FUSED_DECODE=1` turns it on for CUDA devices ([`wanted`]).
//!
//! Each function here also runs on the CPU as the same arithmetic in candle ops (what the
//! unfused path computes): that path tests the wiring (stacked weights, cache slots, groups of
//! rows) against the plain path on every machine, and is the reference the emulated kernels are
//! tested against (`tests/decode_kernels_on_cpu.rs`).

use candle_core::{Device, Tensor, D};

use crate::error::Result;

/// Whether decoding steps on `device` take the fused path (`FLASH_INTERP_FUSED_DECODE=1`, or
/// `FLASH_INTERP_CUDA_GRAPH=1`, whose replays need it; on a CUDA device).
pub(crate) fn wanted(device: &Device) -> bool {
    device.is_cuda() && (std::env::var("FLASH_INTERP_FUSED_DECODE").is_ok_and(|v| v == "1") || super::graph::wanted(device))
}

/// Largest head dim the attention kernel takes (a multiple of 32 up to this).
pub const MAX_HEAD_DIM: usize = 256;

/// Threads per block of the attention kernel: 32 × `ATT_WARPS` of `kernels/decode.cu` (the
/// kernel traps on any other count).
pub const ATTENTION_THREADS: u32 = 32 * 16;

/// Whether heads of `head_dim` fit the attention kernel.
pub(crate) fn head_dim_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32) && head_dim <= MAX_HEAD_DIM
}

/// A layer's attention heads.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads, key/value heads, head dim.
    pub h: usize,
    pub kvh: usize,
    pub d: usize,
    /// RoPE on pairs `(2i, 2i + 1)` (candle's `rope_i`) rather than halves (`rope`).
    pub interleaved: bool,
}

/// Where a decoding step writes in the caches: position `at`, also held on the device in `dev`
/// (`[1]`, u32), where the GPU kernels read it. The kernels take it from there, not as an
/// argument, so that a CUDA graph captured once replays the step at each new position (the host
/// writes it between replays: `Cache::step_slot`).
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    pub at: usize,
    pub dev: &'a Tensor,
}

/// RoPE of one position's queries and keys, from the stacked projection `qkv`
/// (`[rows, 1, (h + 2 kvh) d]`: each row's Q, K and V heads), at row `slot.at` of the RoPE
/// tables `(cos, sin)` (`[positions, d / 2]`); the keys and values are written into the caches
/// (`[rows, kvh, cap, d]`, contiguous) at position `slot.at`. Returns the queries,
/// `[rows, h, 1, d]`.
pub fn rope_append(qkv: &Tensor, tables: &(Tensor, Tensor), slot: Slot, k_cache: &Tensor, v_cache: &Tensor, heads: Heads) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if qkv.device().is_cuda() {
        return gpu::rope_append(qkv, tables, slot, k_cache, v_cache, heads);
    }
    let Heads { h, kvh, d, interleaved } = heads;
    let at = slot.at;
    // What the kernels would read: the CPU path checks it, so that the tests of the fused step on
    // the CPU also check the position kept on the device (`Cache::step_slot`) step after step.
    let held = slot.dev.flatten_all()?.to_vec1::<u32>()?;
    if held != [at as u32] {
        return Err(crate::error::Error::bad(format!("a fused step at position {at} whose device copy holds {held:?}")));
    }
    let (cos, sin) = (tables.0.narrow(0, at, 1)?, tables.1.narrow(0, at, 1)?);
    let rows = qkv.dim(0)?;
    let qkv = qkv.reshape((rows, h + 2 * kvh, 1, d))?;
    let rope = |x: Tensor| super::common::rope(&x, &cos, &sin, interleaved);
    let (q, k) = (rope(qkv.narrow(1, 0, h)?)?, rope(qkv.narrow(1, h, kvh)?)?);
    k_cache.slice_set(&k, 2, at)?;
    v_cache.slice_set(&qkv.narrow(1, h + kvh, kvh)?.contiguous()?, 2, at)?;
    Ok(q)
}

/// Attention of one position's queries `q` (`[rows, h, 1, d]`) over the first `slot.at + 1`
/// positions of the caches (`[rows, kvh, cap, d]`: those before the step and its own), query head
/// `j` reading key/value head `j / (h / kvh)`, scores scaled by `scale`. Returns `[rows, 1, h d]`.
pub fn attend(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slot: Slot, scale: f64) -> Result<Tensor> {
    let (rows, h, _, d) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return gpu::attend(q, k_cache, v_cache, slot, scale);
    }
    let len = slot.at + 1;
    let n_rep = h / k_cache.dim(1)?;
    let y = super::common::attend(q, &k_cache.narrow(2, 0, len)?, &v_cache.narrow(2, 0, len)?, n_rep, scale, None, None, None)?;
    Ok(y.transpose(1, 2)?.reshape((rows, 1, h * d))?)
}

/// The residual add and the RMS norm after it: `(x + y, rms_norm(x + y) · w)`.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::add_rms_norm(x, y, w, eps);
    }
    let sum = (x + y)?;
    let normed = candle_nn::ops::rms_norm(&sum, w, eps)?;
    Ok((sum, normed))
}

/// SiLU(gate) · up from the stacked product `gu` (`[..., 2 n]`: gate, then up).
pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gu.device().is_cuda() {
        return gpu::silu_mul(gu);
    }
    let n = gu.dim(D::Minus1)? / 2;
    Ok((candle_nn::ops::silu(&gu.narrow(D::Minus1, 0, n)?)? * gu.narrow(D::Minus1, n, n)?)?)
}

/// The same on a CUDA device: the kernels of `kernels/decode.cu`, on the device's one stream
/// (see `engine::cuda_device`), so that what they read was written before and what they write
/// is read after, in the order the host queues work.
#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Shape, Storage, Tensor, D};

    use super::{Heads, Slot};
    use crate::error::{Error, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

    fn bad(what: impl std::fmt::Display) -> Error {
        Error::Candle(candle_core::Error::Msg(format!("fused decoding: {what}")))
    }

    /// The tensor's device, and the address of its first element (it must be contiguous).
    fn at(t: &Tensor) -> Result<(CudaDevice, u64)> {
        let (s, l) = t.storage_and_layout();
        let Storage::Cuda(c) = &*s else { return Err(bad("a tensor off the GPU")) };
        if !l.is_contiguous() {
            return Err(bad(format!("a tensor of strides {:?} for shape {:?}", l.stride(), l.dims())));
        }
        let dev = c.device().clone();
        let stream = dev.cuda_stream();
        let base = match t.dtype() {
            DType::F32 => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            DType::BF16 => c.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            DType::F16 => c.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
            other => return Err(bad(format!("{other:?} tensors"))),
        };
        Ok((dev, base + (l.start_offset() * t.dtype().size_in_bytes()) as u64))
    }

    fn ptr(t: &Tensor) -> Result<u64> {
        Ok(at(t)?.1)
    }

    /// A new uninitialised tensor of `shape` (every element is written by the kernel it is
    /// made for), and its address.
    fn output(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<(Tensor, u64)> {
        /// `n` elements of `T`, wrapped as storage, and their address.
        fn alloc<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<(CudaStorage, u64)> {
            // SAFETY: the callers' kernels write every element before anything reads it.
            let s = unsafe { dev.alloc::<T>(n)? };
            let p = s.device_ptr(&dev.cuda_stream()).0;
            Ok((CudaStorage::wrap_cuda_slice(s, dev.clone()), p))
        }
        let shape = shape.into();
        let n = shape.elem_count();
        let (storage, p) = match dtype {
            DType::F32 => alloc::<f32>(dev, n)?,
            DType::BF16 => alloc::<half::bf16>(dev, n)?,
            DType::F16 => alloc::<half::f16>(dev, n)?,
            other => return Err(bad(format!("{other:?} tensors"))),
        };
        Ok((Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false), p))
    }

    /// The kernel `name` for `dtype`'s elements (`name_f32`, `name_bf16`, `name_f16`), looked up
    /// once per device: candle's lookup formats the name and asks the driver for the function
    /// each time, and a fused step launches five of these per layer.
    fn kernel(dev: &CudaDevice, name: &'static str, dtype: DType) -> Result<CudaFunction> {
        type Key = (DeviceId, &'static str, DType);
        static FUNCS: LazyLock<Mutex<HashMap<Key, CudaFunction>>> = LazyLock::new(Default::default);
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(bad(format!("{dtype:?} tensors")));
        }
        let key = (dev.id(), name, dtype);
        let funcs = || FUNCS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(f) = funcs().get(&key) {
            return Ok(f.clone());
        }
        let f = dev.get_or_load_custom_func(&format!("{name}_{}", dtype.as_str()), "flash_interp_decode", PTX)?.into_cuda_function();
        funcs().insert(key, f.clone());
        Ok(f)
    }

    /// Launch a kernel whose arguments are pushed.
    ///
    /// # Safety
    /// The arguments must be those of the kernel's signature in kernels/decode.cu (device
    /// addresses as u64, sizes as u32 or u64, floats as f32), for buffers of the sizes the kernel
    /// indexes for `cfg`'s grid.
    unsafe fn go(mut b: LaunchArgs, cfg: LaunchConfig) -> Result<()> {
        unsafe { b.launch(cfg) }.map_err(|e| bad(format!("a kernel launch: {e}")))?;
        Ok(())
    }

    fn same_dtype(ts: &[&Tensor]) -> Result<DType> {
        let dt = ts[0].dtype();
        if ts.iter().any(|t| t.dtype() != dt) {
            return Err(bad(format!("mixed dtypes {:?}", ts.iter().map(|t| t.dtype()).collect::<Vec<_>>())));
        }
        Ok(dt)
    }

    /// The device address of the slot's position, checked to be one u32 on the GPU.
    fn slot_ptr(slot: Slot) -> Result<u64> {
        let (s, l) = slot.dev.storage_and_layout();
        let Storage::Cuda(c) = &*s else { return Err(bad("a step's position off the GPU")) };
        if slot.dev.dtype() != DType::U32 || slot.dev.elem_count() != 1 {
            return Err(bad(format!("a step's position of {:?} {:?}", slot.dev.dtype(), slot.dev.dims())));
        }
        let stream = c.device().cuda_stream();
        let base = c.as_cuda_slice::<u32>()?.device_ptr(&stream).0;
        Ok(base + (l.start_offset() * 4) as u64)
    }

    pub(super) fn rope_append(
        qkv: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        slot: Slot,
        k_cache: &Tensor,
        v_cache: &Tensor,
        heads: Heads,
    ) -> Result<Tensor> {
        let Heads { h, kvh, d, interleaved } = heads;
        let dtype = same_dtype(&[qkv, cos, sin, k_cache, v_cache])?;
        let rows = qkv.dim(0)?;
        let (kb, kh, cap, kd) = k_cache.dims4()?;
        let at_pos = slot.at;
        if qkv.elem_count() != rows * (h + 2 * kvh) * d || (kb, kh, kd) != (rows, kvh, d) || v_cache.dims() != k_cache.dims() || at_pos >= cap {
            return Err(bad(format!("qkv {:?} into caches {:?} at {at_pos}", qkv.dims(), k_cache.dims())));
        }
        if cos.dims() != sin.dims() || cos.dim(1)? != d / 2 || at_pos >= cos.dim(0)? {
            return Err(bad(format!("RoPE tables {:?} at {at_pos} for head dim {d}", cos.dims())));
        }
        let (dev, src) = at(qkv)?;
        let (c, s, p, kc, vc) = (ptr(cos)?, ptr(sin)?, slot_ptr(slot)?, ptr(k_cache)?, ptr(v_cache)?);
        let (q, qp) = output(&dev, dtype, (rows, h, 1, d))?;
        let (h32, kvh32, d32, cap64, il) = (h as u32, kvh as u32, d as u32, cap as u64, interleaved as u32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, (h + 2 * kvh) as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        let f = kernel(&dev, "rope_append", dtype)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&src).arg(&c).arg(&s).arg(&p).arg(&qp).arg(&kc).arg(&vc).arg(&h32).arg(&kvh32).arg(&d32).arg(&cap64).arg(&il);
        // SAFETY: rope_append's signature; `q` holds rows × h × d, the caches rows × kvh × cap ×
        // d, the RoPE tables d / 2 per position; the position the kernel reads is the slot's
        // (below cap and the tables' length, checked above; the kernel traps past cap).
        unsafe { go(b, cfg) }?;
        Ok(q)
    }

    pub(super) fn attend(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slot: Slot, scale: f64) -> Result<Tensor> {
        let dtype = same_dtype(&[q, k_cache, v_cache])?;
        let (rows, h, t, d) = q.dims4()?;
        let (kb, kvh, cap, kd) = k_cache.dims4()?;
        let len = slot.at + 1;
        if t != 1 || (kb, kd) != (rows, d) || v_cache.dims() != k_cache.dims() || kvh == 0 || h % kvh != 0 || len > cap || !super::head_dim_fits(d) {
            return Err(bad(format!("attention of {:?} over caches {:?} ({len} positions)", q.dims(), k_cache.dims())));
        }
        let (dev, qp) = at(q)?;
        let (kc, vc, p) = (ptr(k_cache)?, ptr(v_cache)?, slot_ptr(slot)?);
        let (y, yp) = output(&dev, dtype, (rows, 1, h * d))?;
        let (h32, kvh32, d32, cap64, sc) = (h as u32, kvh as u32, d as u32, cap as u64, scale as f32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, h as u32, 1), block_dim: (super::ATTENTION_THREADS, 1, 1), shared_mem_bytes: 0 };
        let f = kernel(&dev, "decode_attention", dtype)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&qp).arg(&kc).arg(&vc).arg(&yp).arg(&h32).arg(&kvh32).arg(&d32).arg(&cap64).arg(&p).arg(&sc);
        // SAFETY: decode_attention's signature; `q` and `y` hold rows × h × d, the caches rows ×
        // kvh × cap × d, and d fits the kernel (checked above); it reads the slot's position + 1
        // keys (at most cap, checked above; the kernel traps past cap).
        unsafe { go(b, cfg) }?;
        Ok(y)
    }

    pub(super) fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let dtype = same_dtype(&[x, y, w])?;
        let n = x.dim(D::Minus1)?;
        if x.dims() != y.dims() || w.elem_count() != n {
            return Err(bad(format!("adding {:?} to {:?}, norm weights {:?}", y.dims(), x.dims(), w.dims())));
        }
        let rows = x.elem_count() / n;
        let (dev, xp) = at(x)?;
        let (yp, wp) = (ptr(y)?, ptr(w)?);
        let (sum, sp) = output(&dev, dtype, x.shape().clone())?;
        let (normed, np) = output(&dev, dtype, x.shape().clone())?;
        let n32 = n as u32;
        let threads = if n >= 1024 { 1024 } else { n.next_multiple_of(32) as u32 };
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let f = kernel(&dev, "add_rms_norm", dtype)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&wp).arg(&sp).arg(&np).arg(&n32).arg(&eps);
        // SAFETY: add_rms_norm's signature; x, y and both outputs hold rows × n, w holds n.
        unsafe { go(b, cfg) }?;
        Ok((sum, normed))
    }

    pub(super) fn silu_mul(gu: &Tensor) -> Result<Tensor> {
        let dtype = gu.dtype();
        let mut dims = gu.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || width % 2 != 0 {
            return Err(bad(format!("gate·up of shape {dims:?}")));
        }
        let n = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let total = gu.elem_count() / 2;
        let (dev, gp) = at(gu)?;
        let (out, op) = output(&dev, dtype, dims)?;
        let (n32, total64) = (n as u32, total as u64);
        let cfg = LaunchConfig { grid_dim: (total.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let f = kernel(&dev, "silu_mul", dtype)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&gp).arg(&op).arg(&n32).arg(&total64);
        // SAFETY: silu_mul's signature; `gu` holds 2 × total elements, `out` total.
        unsafe { go(b, cfg) }?;
        Ok(out)
    }
}
