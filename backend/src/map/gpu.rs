//! The neuron map on a CUDA device, end to end: the unembedding and the directions stay on the
//! device in the model's dtype; each chunk of neurons is multiplied with `W_U` by cuBLAS
//! (`gemm_ex`: bf16 or f16 inputs, or f32 / TF32, with f32 logits out), and one thread block per
//! neuron reduces its row of logits (`kernels/map.cu`, whose CPU twin is [`super::select`]).
//! Only the per-neuron results come back to the host: 2 logsumexps, 4 moments and 2 × k top
//! tokens per neuron.

use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys as blas};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

use super::kernel::{Moments, NeuronReduction, PolarityReduction};
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

/// The unembedding on the device, reused for every layer.
pub struct GpuReducer {
    dev: CudaDevice,
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
        Ok(Self { dev: dev.clone(), wu: wu.contiguous()?, vocab, d })
    }

    pub fn dtype(&self) -> DType {
        self.wu.dtype()
    }

    /// Reduce every row of the directions, given as the sum of `parts` (each `[n, d]` on the
    /// same device, converted to the unembedding's dtype; see [`super::split_directions`]),
    /// keeping the top `k` of each polarity. The parts' logits are summed in f32 by cuBLAS.
    pub fn reduce(&self, parts: &[Tensor], k: usize, on_rows: &(dyn Fn(usize) + Sync)) -> Result<Vec<NeuronReduction>> {
        let (n, d) = parts[0].dims2()?;
        assert_eq!(d, self.d);
        assert!(k >= 1 && k <= self.vocab.min(MAX_K), "k = {k}");
        let parts = parts.iter().map(|p| Ok(p.to_dtype(self.wu.dtype())?.contiguous()?)).collect::<Result<Vec<_>>>()?;
        let chunk = (CHUNK_BYTES / (4 * self.vocab)).clamp(1, n.max(1));
        let func = self.dev.get_or_load_custom_func("map_reduce_rows", "flash_interp_map", PTX)?;
        // SAFETY: every element is written by the product before the kernel reads it.
        let logits = unsafe { self.dev.alloc::<f32>(chunk * self.vocab)? };
        let mut logits = logits;
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            for (i, part) in parts.iter().enumerate() {
                self.logits(&part.narrow(0, start, rows)?, &mut logits, rows, i > 0)?;
            }
            let mut lse = self.dev.alloc_zeros::<f32>(rows * 2)?;
            let mut mom = self.dev.alloc_zeros::<f64>(rows * 4)?;
            let mut top_val = self.dev.alloc_zeros::<f32>(rows * 2 * k)?;
            let mut top_id = self.dev.alloc_zeros::<u32>(rows * 2 * k)?;
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
            let (vocab, kk) = (self.vocab as u64, k as i32);
            let mut b = func.builder();
            b.arg(&logits).arg(&vocab).arg(&kk).arg(&mut lse).arg(&mut mom).arg(&mut top_val).arg(&mut top_id);
            // SAFETY: the kernel's signature is (const float*, u64, int, float*, double*, float*,
            // u32*) and each buffer has the size it indexes for `rows` blocks.
            unsafe { b.launch(cfg) }.map_err(cuda)?;
            let (lse, mom) = (self.dev.clone_dtoh(&lse)?, self.dev.clone_dtoh(&mom)?);
            let (top_val, top_id) = (self.dev.clone_dtoh(&top_val)?, self.dev.clone_dtoh(&top_id)?);
            for r in 0..rows {
                let top = |p: usize| {
                    let o = (r * 2 + p) * k;
                    top_val[o..o + k].iter().copied().zip(top_id[o..o + k].iter().copied()).collect()
                };
                let m = &mom[r * 4..r * 4 + 4];
                out.push(NeuronReduction {
                    pos: PolarityReduction { lse: lse[r * 2], top: top(0) },
                    neg: PolarityReduction { lse: lse[r * 2 + 1], top: top(1) },
                    moments: Moments { n: self.vocab as f64, mean: m[0], m2: m[1], m3: m[2], m4: m[3] },
                });
            }
            on_rows(rows);
        }
        Ok(out)
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
