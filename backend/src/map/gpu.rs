//! The neuron map on a CUDA device, end to end: the unembedding and the directions stay on the
//! device in the model's dtype; each chunk of neurons is multiplied with `W_U` by cuBLAS
//! (`gemm_ex`: bf16 or f16 inputs, or f32 / TF32, with f32 logits out), and one thread block per
//! neuron reduces its row of logits (`kernels/map.cu`, whose CPU twin is [`super::select`]).
//! Only the per-neuron results come back to the host: 2 logsumexps, 4 moments and 2 × k top
//! tokens per neuron.
//!
//! Layers are queued ([`GpuReducer::launch`]) by one host thread while another brings the
//! finished ones back ([`GpuReducer::collect`], on a stream of its own that waits for that layer
//! alone) and files them, so the device multiplies and reduces while the host copies and files.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys as blas};
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUevent_flags, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

use super::kernel::Reductions;
use super::select::{MAX_K, THREADS};
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/map.ptx"));

/// Bytes of f32 logits one chunk may hold (the chunk's rows × vocabulary).
const CHUNK_BYTES: usize = 1 << 30;

/// How the product runs on f32 weights: exact f32, or TF32 tensor cores
/// (`FLASH_INTERP_TF32=1`). bf16 and f16 weights always use their tensor cores with f32
/// accumulation.
fn tf32() -> bool {
    std::env::var("FLASH_INTERP_TF32").is_ok_and(|v| v == "1")
}

fn cuda(e: impl std::fmt::Display) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("CUDA: {e}")))
}

/// Device time of the products and of the reductions, host time queueing, waiting for and
/// copying results, and filing them (ns), and rows that took the kernel's radix select, since
/// the last [`take_stats`].
static PRODUCT_NS: AtomicU64 = AtomicU64::new(0);
static REDUCE_NS: AtomicU64 = AtomicU64::new(0);
static QUEUE_NS: AtomicU64 = AtomicU64::new(0);
static COPY_NS: AtomicU64 = AtomicU64::new(0);
pub(crate) static FILE_NS: AtomicU64 = AtomicU64::new(0);
static RADIX_ROWS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn add_since(counter: &AtomicU64, t: Instant) {
    counter.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Where the GPU maps' time went since the last call: on the device (CUDA events around each
/// chunk's product and reduction) and on the host (queueing the work, waiting for and copying
/// the results, filing them into the map's tables), and how many rows took the radix select
/// rather than the shared sort.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct GpuStats {
    pub product_seconds: f64,
    pub reduce_seconds: f64,
    pub host_queue_seconds: f64,
    pub host_wait_copy_seconds: f64,
    pub host_file_seconds: f64,
    pub radix_rows: u64,
}

pub fn take_stats() -> GpuStats {
    let secs = |c: &AtomicU64| c.swap(0, Ordering::Relaxed) as f64 * 1e-9;
    GpuStats {
        product_seconds: secs(&PRODUCT_NS),
        reduce_seconds: secs(&REDUCE_NS),
        host_queue_seconds: secs(&QUEUE_NS),
        host_wait_copy_seconds: secs(&COPY_NS),
        host_file_seconds: secs(&FILE_NS),
        radix_rows: RADIX_ROWS.swap(0, Ordering::Relaxed),
    }
}

/// One call's reduction, queued on the device: its results stay there until
/// [`GpuReducer::collect`].
pub struct Pending {
    rows: usize,
    k: usize,
    lse: CudaSlice<f32>,
    mom: CudaSlice<f64>,
    top_val: CudaSlice<f32>,
    top_id: CudaSlice<u32>,
    radix: CudaSlice<u32>,
    /// Recorded after the last kernel.
    done: CudaEvent,
    /// Per chunk: before its product, after it, after its reduction.
    times: Vec<[CudaEvent; 3]>,
}

impl Pending {
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// The unembedding on the device, reused for every layer.
pub struct GpuReducer {
    dev: CudaDevice,
    /// Where results are copied back, after their layer's event, so that a copy does not wait
    /// for the layers queued after it.
    copy: Arc<CudaStream>,
    /// The chunk of logits, kept from one launch to the next (the stream orders its uses).
    logits: Mutex<Option<CudaSlice<f32>>>,
    /// `[vocab, d]`, contiguous, in the dtype the directions are given in.
    wu: Tensor,
    vocab: usize,
    d: usize,
}

impl GpuReducer {
    /// `wu`: the LM head `[vocab, d]` on a CUDA device (bf16, f16 or f32).
    pub fn new(wu: &Tensor) -> Result<Self> {
        let Device::Cuda(dev) = wu.device() else { return Err(cuda("the GPU map needs the unembedding on a CUDA device")) };
        let (vocab, d) = wu.dims2()?;
        if !matches!(wu.dtype(), DType::BF16 | DType::F16 | DType::F32) {
            return Err(cuda(format!("the GPU map multiplies bf16, f16 or f32, not {:?}", wu.dtype())));
        }
        let copy = dev.cuda_stream().context().new_stream().map_err(cuda)?;
        Ok(Self { dev: dev.clone(), copy, logits: Mutex::new(None), wu: wu.contiguous()?, vocab, d })
    }

    pub fn dtype(&self) -> DType {
        self.wu.dtype()
    }

    /// Queue the reduction of every row of the directions, given as the sum of `parts` (each
    /// `[n, d]` on the same device, converted to the unembedding's dtype; see
    /// [`super::split_directions`]), keeping the top `k` of each polarity, on the device's stream,
    /// and return at once. The parts' logits are summed in f32 by cuBLAS.
    pub fn launch(&self, parts: &[Tensor], k: usize) -> Result<Pending> {
        let t = Instant::now();
        let (n, d) = parts[0].dims2()?;
        if n == 0 {
            return Err(cuda("no directions to reduce"));
        }
        assert_eq!(d, self.d);
        assert!(k >= 1 && k <= self.vocab.min(MAX_K), "k = {k}");
        let parts = parts.iter().map(|p| Ok(p.to_dtype(self.wu.dtype())?.contiguous()?)).collect::<Result<Vec<_>>>()?;
        let chunk = (CHUNK_BYTES / (4 * self.vocab)).clamp(1, n.max(1));
        let func = self.dev.get_or_load_custom_func("map_reduce_rows", "flash_interp_map", PTX)?;
        let stream = self.dev.cuda_stream();
        let mut kept = self.logits.lock().unwrap_or_else(|e| e.into_inner());
        let logits = match kept.take() {
            Some(l) if l.len() >= chunk * self.vocab => l,
            // SAFETY: every element is written by the product before the kernel reads it.
            _ => unsafe { self.dev.alloc::<f32>(chunk * self.vocab)? },
        };
        let logits = kept.insert(logits);
        let mut lse = self.dev.alloc_zeros::<f32>(n * 2)?;
        let mut mom = self.dev.alloc_zeros::<f64>(n * 4)?;
        let mut top_val = self.dev.alloc_zeros::<f32>(n * 2 * k)?;
        let mut top_id = self.dev.alloc_zeros::<u32>(n * 2 * k)?;
        let mut radix = self.dev.alloc_zeros::<u32>(1)?;
        let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda);
        let mut times = Vec::new();
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let before = event()?;
            for (i, part) in parts.iter().enumerate() {
                self.logits(&part.narrow(0, start, rows)?, logits, rows, i > 0)?;
            }
            let multiplied = event()?;
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
            let (vocab, kk) = (self.vocab as u64, k as i32);
            let mut lse = lse.slice_mut(start * 2..(start + rows) * 2);
            let mut mom = mom.slice_mut(start * 4..(start + rows) * 4);
            let mut top_val = top_val.slice_mut(start * 2 * k..(start + rows) * 2 * k);
            let mut top_id = top_id.slice_mut(start * 2 * k..(start + rows) * 2 * k);
            let mut b = func.builder();
            b.arg(&*logits).arg(&vocab).arg(&kk).arg(&mut lse).arg(&mut mom).arg(&mut top_val).arg(&mut top_id).arg(&mut radix);
            // SAFETY: the kernel's signature is (const float*, u64, int, float*, double*, float*,
            // u32*, u32*) and each buffer has the size it indexes for `rows` blocks.
            unsafe { b.launch(cfg) }.map_err(cuda)?;
            times.push([before, multiplied, event()?]);
        }
        let done = stream.record_event(None).map_err(cuda)?;
        add_since(&QUEUE_NS, t);
        Ok(Pending { rows: n, k, lse, mom, top_val, top_id, radix, done, times })
    }

    /// Bring a queued reduction back (waiting for it, and for nothing queued after it).
    pub fn collect(&self, p: Pending) -> Result<Reductions> {
        let t = Instant::now();
        self.copy.wait(&p.done).map_err(cuda)?;
        let (lse, mom) = (self.copy.clone_dtoh(&p.lse).map_err(cuda)?, self.copy.clone_dtoh(&p.mom).map_err(cuda)?);
        let (top_val, top_id) = (self.copy.clone_dtoh(&p.top_val).map_err(cuda)?, self.copy.clone_dtoh(&p.top_id).map_err(cuda)?);
        let radix = self.copy.clone_dtoh(&p.radix).map_err(cuda)?;
        self.copy.synchronize().map_err(cuda)?;
        add_since(&COPY_NS, t);
        RADIX_ROWS.fetch_add(radix[0] as u64, Ordering::Relaxed);
        // Timings only feed the statistics: one that cannot be read is left out, not an error.
        for [a, b, c] in &p.times {
            let ns = |x: &CudaEvent, y: &CudaEvent| x.elapsed_ms(y).map_or(0, |ms| (ms as f64 * 1e6) as u64);
            PRODUCT_NS.fetch_add(ns(a, b), Ordering::Relaxed);
            REDUCE_NS.fetch_add(ns(b, c), Ordering::Relaxed);
        }
        Ok(Reductions { k: p.k, vocab: self.vocab, lse, mom, top_val, top_id })
    }

    /// `out[r, v] = dirs[r] · wu[v]` (`+=` when `accumulate`) for the `rows` rows of `dirs`, f32,
    /// row-major `[rows, vocab]`. Column-major, that is `outᵀ = W_Uᵀ-as-stored · dirsᵀ`:
    /// m = vocab, n = rows, k = d.
    fn logits(&self, dirs: &Tensor, out: &mut CudaSlice<f32>, rows: usize, accumulate: bool) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::sys::{cublasComputeType_t as C, cudaDataType_t as T};
        let stream = self.dev.cuda_stream();
        let blas = self.dev.cublas_handle();
        let (wu_s, wu_l) = self.wu.storage_and_layout();
        let (di_s, di_l) = dirs.storage_and_layout();
        let (Storage::Cuda(wu_s), Storage::Cuda(di_s)) = (&*wu_s, &*di_s) else { return Err(cuda("not CUDA tensors")) };
        let (ty, compute, size) = match self.wu.dtype() {
            DType::BF16 => (T::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F, 2),
            DType::F16 => (T::CUDA_R_16F, C::CUBLAS_COMPUTE_32F, 2),
            _ if tf32() => (T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F_FAST_TF32, 4),
            _ => (T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F, 4),
        };
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        let (m, n, kd) = (self.vocab as i32, rows as i32, self.d as i32);
        let (c, _record) = out.device_ptr_mut(&stream);
        let (offset_a, offset_b) = ((wu_l.start_offset() * size) as u64, (di_l.start_offset() * size) as u64);
        let gemm = |a: u64, b: u64| -> Result<()> {
            // SAFETY: a is [vocab, d] and b [rows, d], both contiguous, c holds rows × vocab f32;
            // the handle is bound to the device's stream, where every tensor here was written.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    kd,
                    (&alpha) as *const f32 as *const _,
                    (a + offset_a) as *const _,
                    ty,
                    kd,
                    (b + offset_b) as *const _,
                    ty,
                    kd,
                    (&beta) as *const f32 as *const _,
                    c as *mut _,
                    T::CUDA_R_32F,
                    m,
                    compute,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(cuda)
        };
        match self.wu.dtype() {
            DType::BF16 => with_ptrs::<half::bf16>(wu_s, di_s, &stream, gemm),
            DType::F16 => with_ptrs::<half::f16>(wu_s, di_s, &stream, gemm),
            _ => with_ptrs::<f32>(wu_s, di_s, &stream, gemm),
        }
    }
}

/// `f` with the device pointers of two storages of `T`; their guards, which record the reads on
/// the stream when dropped, live until `f` has queued its work.
fn with_ptrs<T: CudaDType>(a: &CudaStorage, b: &CudaStorage, stream: &CudaStream, f: impl FnOnce(u64, u64) -> Result<()>) -> Result<()> {
    let (pa, _ga) = a.as_cuda_slice::<T>()?.device_ptr(stream);
    let (pb, _gb) = b.as_cuda_slice::<T>()?.device_ptr(stream);
    f(pa, pb)
}
