//! Exact-weight quantized matmuls on the CPU: `y = x · Wᵀ` with `W` kept as the GGUF's own
//! blocks (a quarter of f32's memory traffic for 4-bit files) and `x` in f32. Each block is
//! dequantized in registers exactly as candle's `dequantize` does it (the f32 path's weights), so
//! the result is the f32 path's up to summation order; unlike llama.cpp (and candle's `QMatMul`),
//! the activations are never quantized to 8 bits.
//!
//! One token (decoding) runs fused kernels for Q4_0, Q4_1, Q5_0 and Q8_0 that never write the
//! dequantized weights anywhere; other block types (the K-quants, ...) go one block at a time
//! through candle's own `to_float` into a buffer that stays in L1. A few rows of activations (a
//! batch of generated tokens, below [`SLAB_ROWS`]) run the same fused kernels with each block
//! dequantized once for up to [`TILE`] rows at a time, each row accumulated exactly as one row
//! alone is (so a row's result does not depend on its batch); the other block types dequantize
//! one weight row at a time and dot it with each row, below [`SLAB_ROWS_OTHER`] rows. From there
//! on (prompts), slabs of the weight are dequantized into candle's f32 matmul. The same
//! Rust is compiled for AVX-512, AVX2+FMA and plain x86-64 (or any other target), and the best the
//! CPU has is picked at run time. On AVX-512, 4-bit blocks are dequantized by a table lookup in
//! registers instead ([`avx512`]): the same weights, the same order, the same bits as AVX2.

use std::sync::{Arc, LazyLock};

use candle_core::quantized::k_quants::{self as kq, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

fn fail(message: String) -> Error {
    candle_core::Error::Msg(message).into()
}

/// The instruction sets a kernel can be compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU runs.
    pub fn detect() -> Isa {
        static BEST: LazyLock<Isa> = LazyLock::new(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        });
        *BEST
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => Isa::detect() == Isa::Avx512,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// The block types kept as they are. Anything else (f16, bf16, f32, ...) is held dense.
pub fn supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K)
}

/// A weight `[rows, cols]` held as its quantized blocks.
pub struct ExactLinear {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// The blocks, row after row, in 8-byte words so they can be viewed as candle's block types
    /// (whose alignment is at most 2; every block size is even).
    words: Vec<u64>,
    row_bytes: usize,
}

impl std::fmt::Debug for ExactLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExactLinear({:?}, {}x{})", self.dtype, self.rows, self.cols)
    }
}

impl ExactLinear {
    /// From a quantized tensor `[rows, cols]` of a supported block type.
    pub fn new(q: &QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let data = q.data()?;
        Self::read(q.dtype(), rows, cols, &mut &data[..])
    }

    /// Its blocks read straight from `r` (e.g. a GGUF file at the tensor's offset) into the
    /// words held: no copy beside them, where reading a `QTensor` first held the weight three
    /// times at once while loading (the file's bytes, candle's blocks, ours).
    pub fn read(dtype: GgmlDType, rows: usize, cols: usize, r: &mut dyn std::io::Read) -> Result<Self> {
        if !supported(dtype) || !cols.is_multiple_of(dtype.block_size()) {
            return Err(fail(format!("no exact kernel for {dtype:?} weights of shape {rows}x{cols}")));
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let len = rows * row_bytes;
        let mut words = vec![0u64; len.div_ceil(8)];
        r.read_exact(&mut as_bytes_mut(&mut words)[..len]).map_err(|e| fail(format!("{dtype:?} weight of {rows}x{cols} ({len} bytes): {e}")))?;
        Ok(Self { dtype, rows, cols, words, row_bytes })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// Bytes held.
    pub fn storage_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    fn bytes(&self) -> &[u8] {
        &as_bytes(&self.words)[..self.rows * self.row_bytes]
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Rows `r0..r1` as an f32 tensor `[r1 - r0, cols]` on `device`: exactly candle's
    /// `dequantize`, a row per task.
    fn dequantize_rows(&self, r0: usize, r1: usize, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; (r1 - r0) * self.cols];
        out.par_chunks_mut(self.cols).enumerate().for_each(|(i, o)| dequantize_row(self.dtype, self.row(r0 + i), o));
        Ok(Tensor::from_vec(out, (r1 - r0, self.cols), device)?)
    }

    /// The weight as an f32 tensor: exactly candle's `dequantize`.
    pub fn dequantize(&self) -> Result<Tensor> {
        self.dequantize_rows(0, self.rows, &Device::Cpu)
    }

    /// Whether every weight is a finite number (checked a row at a time, in parallel, each task
    /// reusing one row buffer).
    pub fn all_finite(&self) -> bool {
        (0..self.rows)
            .into_par_iter()
            .map_init(
                || vec![0f32; self.cols],
                |buf, r| {
                    dequantize_row(self.dtype, self.row(r), buf);
                    buf.iter().all(|x| x.is_finite())
                },
            )
            .all(|finite| finite)
    }

    /// Rows `ids` of the weight, dequantized (an embedding lookup), `[ids.len(), cols]`.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_mut(self.cols).zip(ids) {
            let r = id as usize;
            if r >= self.rows {
                return Err(fail(format!("row {r} of a {}-row weight", self.rows)));
            }
            dequantize_row(self.dtype, self.row(r), o);
        }
        Ok(Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)?)
    }

    /// Column `c` of the weight, dequantized, `[rows]`: of each row only the block that holds
    /// column `c` is dequantized (a down projection's neuron, without the rest of the layer).
    pub fn column_f32(&self, c: usize) -> Result<Tensor> {
        if c >= self.cols {
            return Err(fail(format!("column {c} of a {}-column weight", self.cols)));
        }
        let (bs, ts) = (self.dtype.block_size(), self.dtype.type_size());
        let (block, k) = (c / bs, c % bs);
        let mut buf = vec![0f32; bs];
        let out: Vec<f32> = (0..self.rows)
            .map(|r| {
                dequantize_row(self.dtype, &self.row(r)[block * ts..(block + 1) * ts], &mut buf);
                buf[k]
            })
            .collect();
        Ok(Tensor::from_vec(out, self.rows, &Device::Cpu)?)
    }

    /// `x · W` for a few rows `x` `[n, rows]`, `[n, cols]` in f32 (a down projection's neurons
    /// against some vectors): each weight row is dequantized into a small buffer and added,
    /// scaled, to every output row; tasks take runs of rows and their sums are added at the end.
    /// No dense copy of the weight is made.
    pub fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        let (n, r) = x.dims2()?;
        if r != self.rows {
            return Err(fail(format!("x · W needs {} columns of x, got {r}", self.rows)));
        }
        let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let cols = self.cols;
        let run = self.rows.div_ceil(rayon::current_num_threads()).max(64);
        let sum = (0..self.rows.div_ceil(run))
            .into_par_iter()
            .map(|t| {
                let (mut acc, mut buf) = (vec![0f32; n * cols], vec![0f32; cols]);
                for row in t * run..((t + 1) * run).min(self.rows) {
                    dequantize_row(self.dtype, self.row(row), &mut buf);
                    for (k, out) in acc.chunks_mut(cols).enumerate() {
                        let a = xv[k * self.rows + row];
                        out.iter_mut().zip(&buf).for_each(|(o, w)| *o += a * w);
                    }
                }
                acc
            })
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            })
            .unwrap_or_else(|| vec![0f32; n * cols]);
        Ok(Tensor::from_vec(sum, (n, cols), &Device::Cpu)?)
    }

    /// `x · Wᵀ` for `x` of shape `[..., cols]` (any float dtype; computed in f32).
    pub fn forward(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Isa::detect())
    }

    /// Many rows of activations (a prompt, a batch): the weight is dequantized a slab of rows
    /// at a time (at most 16 MB of f32) and multiplied by candle's f32 matmul, which reuses each
    /// weight across the rows far better than dot products can.
    fn forward_slabs(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, self.cols))?;
        let slab = ((16 << 20) / (4 * self.cols)).max(1);
        let mut parts = Vec::with_capacity(self.rows.div_ceil(slab));
        for r0 in (0..self.rows).step_by(slab) {
            let w = self.dequantize_rows(r0, (r0 + slab).min(self.rows), x.device())?;
            parts.push(x2.matmul(&w.t()?)?);
        }
        let y = if parts.len() == 1 { parts.pop().unwrap() } else { Tensor::cat(&parts, 1)? };
        let mut out = dims;
        *out.last_mut().unwrap() = self.rows;
        Ok(y.reshape(out)?)
    }

    /// [`ExactLinear::forward`] with the kernels compiled for `isa` (which the CPU must support).
    pub fn forward_with(self: &Arc<Self>, x: &Tensor, isa: Isa) -> Result<Tensor> {
        if !isa.supported() {
            return Err(fail(format!("this CPU cannot run {} kernels", isa.name())));
        }
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        if x.elem_count() / self.cols >= self.slab_rows() {
            return self.forward_slabs(&x);
        }
        Ok(x.apply_op1_no_bwd(&Op(self.clone(), isa))?)
    }

    /// From this many rows of activations on, [`ExactLinear::forward_slabs`].
    pub fn slab_rows(&self) -> usize {
        match self.dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => SLAB_ROWS,
            GgmlDType::Q4K | GgmlDType::Q6K if Isa::detect() == Isa::Avx512 => SLAB_ROWS_KQUANT,
            _ => SLAB_ROWS_OTHER,
        }
    }

    /// `y[t, r] = x[t] · W[r]` for `x` `[t, cols]` row-major.
    fn matmul(&self, x: &[f32], isa: Isa) -> Vec<f32> {
        let t = x.len() / self.cols;
        // Work per task: enough rows that a task is worth handing to another thread, and at
        // least one task per thread for the large matrices.
        let per_row = (self.row_bytes + 4 * self.cols * t.min(8)).max(1);
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = ((256 * 1024) / per_row).clamp(8, self.rows.div_ceil(threads).max(8));
        let mut by_row = vec![0f32; self.rows * t];
        let job = Job { w: self, x, t };
        let run = |(i, out): (usize, &mut [f32])| {
            let r0 = i * rows_per_task;
            // SAFETY: `isa` was checked against the CPU (`Isa::detect` or `supported`).
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => rows_avx512(&job, r0, out),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => rows_avx2(&job, r0, out),
                    _ => rows_body::<false, false>(&job, r0, out),
                }
            }
        };
        if self.rows <= rows_per_task {
            by_row.chunks_mut(rows_per_task * t).enumerate().for_each(run);
        } else {
            by_row.par_chunks_mut(rows_per_task * t).enumerate().for_each(run);
        }
        if t == 1 {
            return by_row;
        }
        let mut y = vec![0f32; t * self.rows];
        for (r, vals) in by_row.chunks(t).enumerate() {
            for (i, v) in vals.iter().enumerate() {
                y[i * self.rows + r] = *v;
            }
        }
        y
    }
}

/// From this many rows of activations on, [`ExactLinear::forward_slabs`]; below, the kernels.
/// A batch of generated tokens (at most `2 × MAX_SAMPLES` = 16 rows) stays on the kernels.
pub const SLAB_ROWS: usize = 17;
/// The same for the block types without a fused kernel (the K-quants, Q5_1), whose row-at-a-time
/// path is slower than the slabs from a few rows on (Gemma 3 270M's 13-token prompt: 0.66 s
/// against 0.16 s).
pub const SLAB_ROWS_OTHER: usize = 4;
/// The same for Q4_K and Q6_K on AVX-512, which have fused kernels ([`avx512::kquant_rows`]): one
/// tile of activation rows (a steer request's normal and steered rows, up to 4 samples) stays on
/// them; from 9 rows on, the slabs are faster (Gemma 3 270M's 13-token prompt: 0.16 s on tiles
/// against 0.08 s).
pub const SLAB_ROWS_KQUANT: usize = TILE + 1;

/// Activation rows one pass of the fused multi-row kernel accumulates (2 × TILE accumulators of
/// 16 lanes: 16 of AVX-512's 32 registers).
pub const TILE: usize = 8;

struct Op(Arc<ExactLinear>, Isa);

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "exact-quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let CpuStorage::F32(data) = storage else { candle_core::bail!("exact matmul: activations must be f32") };
        let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("exact matmul: activations must be contiguous") };
        let dims = layout.shape().dims();
        if dims.last() != Some(&w.cols) {
            candle_core::bail!("exact matmul: activations {dims:?} against a {}x{} weight", w.rows, w.cols)
        }
        let y = w.matmul(&data[a..b], self.1);
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = w.rows;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// One matmul's inputs, shared by the tasks.
struct Job<'a> {
    w: &'a ExactLinear,
    x: &'a [f32],
    t: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rows_avx512(job: &Job, r0: usize, out: &mut [f32]) {
    rows_body::<true, true>(job, r0, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(job: &Job, r0: usize, out: &mut [f32]) {
    rows_body::<true, false>(job, r0, out)
}

/// Rows `r0..` of the product into `out` (`[rows, t]`): everything here is inlined, so it is
/// compiled once per instruction set by the wrappers above. `FMA`: fused multiply-adds for the
/// accumulation (never for the dequantization, which stays candle's `q·d + m`). `V512`: the
/// AVX-512 dequantization of 4-bit blocks ([`avx512`]).
#[inline(always)]
fn rows_body<const FMA: bool, const V512: bool>(job: &Job, r0: usize, out: &mut [f32]) {
    let (w, t, cols) = (job.w, job.t, job.w.cols);
    if t == 1 {
        match w.dtype {
            GgmlDType::Q4_0 => rows_fused::<Q4_0, FMA, V512>(w, r0, job.x, out),
            GgmlDType::Q4_1 => rows_fused::<Q4_1, FMA, V512>(w, r0, job.x, out),
            GgmlDType::Q5_0 => rows_fused::<Q5_0, FMA, V512>(w, r0, job.x, out),
            GgmlDType::Q8_0 => rows_fused::<Q8_0, FMA, false>(w, r0, job.x, out),
            _ => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = dot_any_v::<FMA, V512>(w.dtype, w.row(r0 + i), job.x);
                }
            }
        }
        return;
    }
    match w.dtype {
        GgmlDType::Q4_0 => return rows_multi::<Q4_0, FMA, V512>(job, r0, out),
        GgmlDType::Q4_1 => return rows_multi::<Q4_1, FMA, V512>(job, r0, out),
        GgmlDType::Q5_0 => return rows_multi::<Q5_0, FMA, V512>(job, r0, out),
        GgmlDType::Q8_0 => return rows_multi::<Q8_0, FMA, false>(job, r0, out),
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    if V512 && matches!(w.dtype, GgmlDType::Q4K | GgmlDType::Q6K) {
        // SAFETY: `V512` is only set in code compiled for (and run on) AVX-512.
        unsafe { avx512::kquant_tiles(job, r0, out) };
        return;
    }
    let mut buf = vec![0f32; cols];
    for (i, o) in out.chunks_mut(t).enumerate() {
        dequantize_row(w.dtype, w.row(r0 + i), &mut buf);
        let bs = w.dtype.block_size();
        for (k, o) in o.iter_mut().enumerate() {
            // Block by block, as `dot_any` sums one row alone.
            *o = buf.chunks_exact(bs).zip(job.x[k * cols..(k + 1) * cols].chunks_exact(bs)).fold(0f32, |total, (wb, xb)| total + dot::<FMA>(wb, xb));
        }
    }
}

/// Rows `r0..r0 + out.len()` · x, one row at a time.
#[inline(always)]
fn rows_fused<B: Block, const FMA: bool, const V512: bool>(w: &ExactLinear, r0: usize, x: &[f32], out: &mut [f32]) {
    let table: &[f32; 65536] = &F16;
    for (i, o) in out.iter_mut().enumerate() {
        #[cfg(target_arch = "x86_64")]
        if V512 {
            // SAFETY: `V512` is only set in code compiled for (and run on) AVX-512.
            *o = unsafe { avx512::dot::<B>(w.row(r0 + i), x) };
            continue;
        }
        *o = B::dot::<FMA>(w.row(r0 + i), x, table);
    }
}

/// Rows `r0..` · each of the `t` activation rows, into `out` (`[rows, t]`): tiles of up to
/// [`TILE`] activation rows, each block of the weight row dequantized once per tile.
#[inline(always)]
fn rows_multi<B: Block, const FMA: bool, const V512: bool>(job: &Job, r0: usize, out: &mut [f32]) {
    let t = job.t;
    let mut k0 = 0;
    while k0 < t {
        let n = (t - k0).min(TILE);
        #[cfg(target_arch = "x86_64")]
        if V512 {
            // SAFETY: as in `rows_fused`.
            unsafe { avx512::tile::<B>(job, r0, k0, n, out) };
            k0 += n;
            continue;
        }
        if n == TILE {
            tile::<B, FMA, TILE>(job, r0, k0, TILE, out);
        } else {
            tile::<B, FMA, TILE>(job, r0, k0, n, out);
        }
        k0 += n;
    }
}

/// Activation rows `k0..k0 + N` against weight rows `r0..`: for each weight block, its 32
/// weights (two halves of 16, exactly as [`Block::dot`] makes them) go into every row's two
/// accumulators, in [`Block::dot`]'s order, so each result is bit for bit the one-row kernel's.
#[inline(always)]
fn tile<B: Block, const FMA: bool, const N: usize>(job: &Job, r0: usize, k0: usize, n: usize, out: &mut [f32]) {
    let (w, t, cols) = (job.w, job.t, job.w.cols);
    let table: &[f32; 65536] = &F16;
    let x = &job.x[k0 * cols..(k0 + n) * cols];
    for (i, o) in out.chunks_mut(t).enumerate() {
        let mut a0 = [[0f32; 16]; N];
        let mut a1 = [[0f32; 16]; N];
        for (b, blk) in w.row(r0 + i).chunks_exact(B::BYTES).enumerate() {
            let (w0, w1) = B::weights(blk, table);
            for k in 0..n {
                let xb = &x[k * cols + b * 32..k * cols + b * 32 + 32];
                madd16::<FMA>(&mut a0[k], &w0, xb[..16].try_into().unwrap());
                madd16::<FMA>(&mut a1[k], &w1, xb[16..].try_into().unwrap());
            }
        }
        for k in 0..n {
            o[k0 + k] = finish(a0[k], a1[k]);
        }
    }
}

/// `acc += w · x`, 16 lanes.
#[inline(always)]
fn madd16<const FMA: bool>(acc: &mut [f32; 16], w: &[f32; 16], x: &[f32; 16]) {
    for j in 0..16 {
        acc[j] = madd::<FMA>(w[j], x[j], acc[j]);
    }
}

#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// A block type of 32 weights whose rows dot with f32 activations in registers. Each weight is
/// what candle's `to_float` makes of it; only the accumulation order differs.
trait Block {
    /// Bytes of one block of 32 weights.
    const BYTES: usize;
    /// [`Block::weights`] in two AVX-512 registers, for the block types [`avx512`] has a
    /// dequantization for (Q4_0, Q4_1, Q5_0); only called for those.
    ///
    /// # Safety
    /// The CPU must have AVX-512 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn weights512(_blk: &[u8]) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        unreachable!("no AVX-512 dequantization for this block type")
    }
    fn dot<const FMA: bool>(row: &[u8], x: &[f32], f16: &[f32; 65536]) -> f32;
    /// One block's weights, the first 16 and the last 16, as [`Block::dot`] computes them.
    fn weights(blk: &[u8], f16: &[f32; 65536]) -> ([f32; 16], [f32; 16]);
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q8_0;

/// Two accumulators of 16 lanes, combined and summed pairwise.
#[inline(always)]
fn finish(mut a: [f32; 16], b: [f32; 16]) -> f32 {
    for j in 0..16 {
        a[j] += b[j];
    }
    hsum(a)
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn weights512(blk: &[u8]) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        avx512::q4_0(blk)
    }

    #[inline(always)]
    fn weights(blk: &[u8], f16: &[f32; 65536]) -> ([f32; 16], [f32; 16]) {
        let d = f16_at(f16, blk[0], blk[1]);
        let qs: &[u8; 16] = blk[2..18].try_into().unwrap();
        let (mut w0, mut w1) = ([0f32; 16], [0f32; 16]);
        for j in 0..16 {
            w0[j] = ((qs[j] & 0x0F) as i16 - 8) as f32 * d;
            w1[j] = ((qs[j] >> 4) as i16 - 8) as f32 * d;
        }
        (w0, w1)
    }
    /// 18-byte blocks: d, 16 bytes of nibbles; `w = (q - 8)·d`.
    #[inline(always)]
    fn dot<const FMA: bool>(row: &[u8], x: &[f32], f16: &[f32; 65536]) -> f32 {
        let (mut a0, mut a1) = ([0f32; 16], [0f32; 16]);
        for (blk, xb) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
            let d = f16_at(f16, blk[0], blk[1]);
            let qs: &[u8; 16] = blk[2..18].try_into().unwrap();
            for j in 0..16 {
                a0[j] = madd::<FMA>(((qs[j] & 0x0F) as i16 - 8) as f32 * d, xb[j], a0[j]);
                a1[j] = madd::<FMA>(((qs[j] >> 4) as i16 - 8) as f32 * d, xb[j + 16], a1[j]);
            }
        }
        finish(a0, a1)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn weights512(blk: &[u8]) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        avx512::q4_1(blk)
    }

    #[inline(always)]
    fn weights(blk: &[u8], f16: &[f32; 65536]) -> ([f32; 16], [f32; 16]) {
        let (d, m) = (f16_at(f16, blk[0], blk[1]), f16_at(f16, blk[2], blk[3]));
        let qs: &[u8; 16] = blk[4..20].try_into().unwrap();
        let (mut w0, mut w1) = ([0f32; 16], [0f32; 16]);
        for j in 0..16 {
            w0[j] = (qs[j] & 0x0F) as f32 * d + m;
            w1[j] = (qs[j] >> 4) as f32 * d + m;
        }
        (w0, w1)
    }
    /// 20-byte blocks: d, m, 16 bytes of nibbles; `w = q·d + m`.
    #[inline(always)]
    fn dot<const FMA: bool>(row: &[u8], x: &[f32], f16: &[f32; 65536]) -> f32 {
        let (mut a0, mut a1) = ([0f32; 16], [0f32; 16]);
        for (blk, xb) in row.chunks_exact(20).zip(x.chunks_exact(32)) {
            let (d, m) = (f16_at(f16, blk[0], blk[1]), f16_at(f16, blk[2], blk[3]));
            let qs: &[u8; 16] = blk[4..20].try_into().unwrap();
            for j in 0..16 {
                a0[j] = madd::<FMA>((qs[j] & 0x0F) as f32 * d + m, xb[j], a0[j]);
                a1[j] = madd::<FMA>((qs[j] >> 4) as f32 * d + m, xb[j + 16], a1[j]);
            }
        }
        finish(a0, a1)
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn weights512(blk: &[u8]) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
        avx512::q5_0(blk)
    }
    #[inline(always)]
    fn weights(blk: &[u8], f16: &[f32; 65536]) -> ([f32; 16], [f32; 16]) {
        let d = f16_at(f16, blk[0], blk[1]);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs: &[u8; 16] = blk[6..22].try_into().unwrap();
        let (mut w0, mut w1) = ([0f32; 16], [0f32; 16]);
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            w0[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
            w1[j] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
        }
        (w0, w1)
    }
    /// 22-byte blocks: d, 32 high bits, 16 bytes of nibbles; `w = (q - 16)·d`.
    #[inline(always)]
    fn dot<const FMA: bool>(row: &[u8], x: &[f32], f16: &[f32; 65536]) -> f32 {
        let (mut a0, mut a1) = ([0f32; 16], [0f32; 16]);
        for (blk, xb) in row.chunks_exact(22).zip(x.chunks_exact(32)) {
            let d = f16_at(f16, blk[0], blk[1]);
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let qs: &[u8; 16] = blk[6..22].try_into().unwrap();
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                a0[j] = madd::<FMA>((((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d, xb[j], a0[j]);
                a1[j] = madd::<FMA>((((qs[j] >> 4) | h1) as i32 - 16) as f32 * d, xb[j + 16], a1[j]);
            }
        }
        finish(a0, a1)
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn weights(blk: &[u8], f16: &[f32; 65536]) -> ([f32; 16], [f32; 16]) {
        let d = f16_at(f16, blk[0], blk[1]);
        let qs: &[u8; 32] = blk[2..34].try_into().unwrap();
        let (mut w0, mut w1) = ([0f32; 16], [0f32; 16]);
        for j in 0..16 {
            w0[j] = qs[j] as i8 as f32 * d;
            w1[j] = qs[j + 16] as i8 as f32 * d;
        }
        (w0, w1)
    }
    /// 34-byte blocks: d, 32 signed bytes; `w = q·d`.
    #[inline(always)]
    fn dot<const FMA: bool>(row: &[u8], x: &[f32], f16: &[f32; 65536]) -> f32 {
        let (mut a0, mut a1) = ([0f32; 16], [0f32; 16]);
        for (blk, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
            let d = f16_at(f16, blk[0], blk[1]);
            let qs: &[u8; 32] = blk[2..34].try_into().unwrap();
            for j in 0..16 {
                a0[j] = madd::<FMA>(qs[j] as i8 as f32 * d, xb[j], a0[j]);
                a1[j] = madd::<FMA>(qs[j + 16] as i8 as f32 * d, xb[j + 16], a1[j]);
            }
        }
        finish(a0, a1)
    }
}

/// 4-bit blocks dequantized by a table instead of arithmetic on each weight: a block's 16
/// possible weights are computed once (`q·d + m` for `q` in 0..16, in candle's order of
/// operations, so they are exactly its weights) into one register, and `vpermps` picks each
/// weight from it by its nibble (it reads only an index's low 4 bits, so the low nibbles need no
/// mask). The block's scales convert with F16C (exact, as the table is). 8 vector instructions
/// per block where the arithmetic took 12.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{finish, Block, Job, TILE};

    /// A block's 16 possible weights `table` picked by its 16 bytes of nibbles at `qs`: the low
    /// nibbles (the first 16 weights), the high ones (the last 16).
    #[inline(always)]
    unsafe fn split(table: __m512, qs: *const u8) -> (__m512, __m512) {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i));
        (_mm512_permutexvar_ps(q, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), table))
    }

    /// The f16 scales at the start of a block: `[first, second, 0, 0]`.
    #[inline(always)]
    unsafe fn scales(blk: &[u8]) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((blk.as_ptr() as *const i32).read_unaligned()))
    }

    /// Q4_0: `w = (q - 8)·d`.
    #[inline(always)]
    pub unsafe fn q4_0(blk: &[u8]) -> (__m512, __m512) {
        assert!(blk.len() >= 18);
        let d = _mm512_broadcastss_ps(scales(blk));
        let q = _mm512_setr_ps(-8., -7., -6., -5., -4., -3., -2., -1., 0., 1., 2., 3., 4., 5., 6., 7.);
        split(_mm512_mul_ps(q, d), blk.as_ptr().add(2))
    }

    /// Q4_1: `w = q·d + m`.
    #[inline(always)]
    pub unsafe fn q4_1(blk: &[u8]) -> (__m512, __m512) {
        assert!(blk.len() >= 20);
        let dm = scales(blk);
        let (d, m) = (_mm512_broadcastss_ps(dm), _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
        let q = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        split(_mm512_add_ps(_mm512_mul_ps(q, d), m), blk.as_ptr().add(4))
    }

    /// Q5_0: `w = (q - 16)·d` for 5-bit `q`, the fifth bits in a 32-bit word: two tables of 16
    /// (`q` below 16 and from 16) picked by `vpermt2ps`, the fifth bit set from a mask register.
    #[inline(always)]
    pub unsafe fn q5_0(blk: &[u8]) -> (__m512, __m512) {
        assert!(blk.len() >= 22);
        let d = _mm512_broadcastss_ps(scales(blk));
        let iota = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        let (below, above) = (_mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(16.)), d), _mm512_mul_ps(iota, d));
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(6) as *const __m128i));
        let sixteen = _mm512_set1_epi32(16);
        let lo = _mm512_and_si512(q, _mm512_set1_epi32(0xF));
        let lo = _mm512_mask_or_epi32(lo, qh as __mmask16, lo, sixteen);
        let hi = _mm512_srli_epi32::<4>(q);
        let hi = _mm512_mask_or_epi32(hi, (qh >> 16) as __mmask16, hi, sixteen);
        (_mm512_permutex2var_ps(below, lo, above), _mm512_permutex2var_ps(below, hi, above))
    }

    #[inline(always)]
    unsafe fn lanes(a: __m512) -> [f32; 16] {
        std::mem::transmute::<__m512, [f32; 16]>(a)
    }

    /// [`Block::dot`] (with fused multiply-adds): the same weights in the same order, so bit for
    /// bit its result.
    #[inline(always)]
    pub unsafe fn dot<B: Block>(row: &[u8], x: &[f32]) -> f32 {
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (blk, xb) in row.chunks_exact(B::BYTES).zip(x.chunks_exact(32)) {
            let (w0, w1) = B::weights512(blk);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb.as_ptr()), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.as_ptr().add(16)), a1);
        }
        finish(lanes(a0), lanes(a1))
    }

    /// Q4_K's super-block (256 weights: f16 `d` and `dmin`, 12 bytes of 6-bit scales and mins for
    /// 8 sub-blocks of 32, 128 bytes of nibbles; `w = d·sc·q - dmin·m`) as 8 chunks of 32 weights
    /// in order, each as two registers handed to `f`: a table per sub-block.
    #[inline(always)]
    unsafe fn q4k_chunks(blk: &[u8], mut f: impl FnMut(usize, __m512, __m512)) {
        let iota = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        let dm = scales(blk);
        let (d, min) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
        let sc: &[u8; 12] = blk[4..16].try_into().unwrap();
        for g in 0..4 {
            let qs = blk.as_ptr().add(16 + 32 * g);
            let (q0, q1) =
                (_mm512_cvtepu8_epi32(_mm_loadu_si128(qs as *const __m128i)), _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(16) as *const __m128i)));
            for half in 0..2 {
                let (s, m) = super::scale_min_k4(2 * g + half, sc);
                let table = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * s as f32), iota), _mm512_set1_ps(min * m as f32));
                let (i0, i1) = if half == 0 { (q0, q1) } else { (_mm512_srli_epi32::<4>(q0), _mm512_srli_epi32::<4>(q1)) };
                f(2 * g + half, _mm512_permutexvar_ps(i0, table), _mm512_permutexvar_ps(i1, table));
            }
        }
    }

    /// Q6_K's super-block (256 weights: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16
    /// signed 8-bit scales, f16 `d`; `w = (d·sc)·(q - 32)`, in candle's layout of two halves of
    /// four quarters) as 8 chunks of 32 weights in order, 16 lanes of 6-bit values at a time.
    #[inline(always)]
    unsafe fn q6k_chunks(blk: &[u8], mut f: impl FnMut(usize, __m512, __m512)) {
        let (low, two, bias) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(3), _mm512_set1_epi32(32));
        let load = |p: *const u8| _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([blk[208], blk[209]]) as i32)));
        for idx in 0..2 {
            let (ql, qh, sc) = (blk.as_ptr().add(64 * idx), blk.as_ptr().add(128 + 32 * idx), &blk[192 + 8 * idx..200 + 8 * idx]);
            for c in 0..4 {
                let mut w = [_mm512_setzero_ps(); 2];
                for (is, w) in w.iter_mut().enumerate() {
                    let l = 16 * is;
                    let lo = load(ql.add(l + 32 * (c % 2)));
                    let lo = if c >= 2 { _mm512_srli_epi32::<4>(lo) } else { _mm512_and_si512(lo, low) };
                    let hi = _mm512_and_si512(_mm512_srlv_epi32(load(qh.add(l)), _mm512_set1_epi32(2 * c as i32)), two);
                    let q = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32::<4>(hi)), bias);
                    *w = _mm512_mul_ps(_mm512_set1_ps(d * sc[is + 2 * c] as i8 as f32), _mm512_cvtepi32_ps(q));
                }
                f(4 * idx + c, w[0], w[1]);
            }
        }
    }

    /// One Q4_K or Q6_K weight row against `N` activation rows (`x`, rows of `cols`): for each,
    /// bit for bit [`super::dot_any`]'s result (per super-block, 32 lanes summed pairwise, then
    /// added up), the weights made once for all `N`.
    #[inline(always)]
    pub unsafe fn kquant_rows<const N: usize>(q4k: bool, row: &[u8], x: &[f32], cols: usize) -> [f32; N] {
        assert!(x.len() >= N * cols && row.len() / if q4k { 144 } else { 210 } * 256 == cols);
        let mut total = [0f32; N];
        for (sb, blk) in row.chunks_exact(if q4k { 144 } else { 210 }).enumerate() {
            let (mut a0, mut a1) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
            let acc = |c: usize, w0: __m512, w1: __m512| {
                for k in 0..N {
                    let xp = x.as_ptr().add(k * cols + 256 * sb + 32 * c);
                    a0[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a0[k]);
                    a1[k] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a1[k]);
                }
            };
            if q4k {
                q4k_chunks(blk, acc)
            } else {
                q6k_chunks(blk, acc)
            }
            for k in 0..N {
                total[k] += finish(lanes(a0[k]), lanes(a1[k]));
            }
        }
        total
    }

    /// [`kquant_rows`] for rows `r0..` of `job`'s weight against its activation rows `k0..k0 + N`.
    #[inline(always)]
    unsafe fn kquant_tile_n<const N: usize>(job: &Job, r0: usize, k0: usize, out: &mut [f32]) {
        let (w, t, cols) = (job.w, job.t, job.w.cols);
        let q4k = w.dtype == candle_core::quantized::GgmlDType::Q4K;
        for (i, o) in out.chunks_mut(t).enumerate() {
            let y = kquant_rows::<N>(q4k, w.row(r0 + i), &job.x[k0 * cols..], cols);
            o[k0..k0 + N].copy_from_slice(&y);
        }
    }

    /// Rows `r0..` of a Q4_K or Q6_K weight against all of `job`'s activation rows, in tiles of
    /// up to [`TILE`].
    #[inline(always)]
    pub unsafe fn kquant_tiles(job: &Job, r0: usize, out: &mut [f32]) {
        let mut k0 = 0;
        while k0 < job.t {
            let n = (job.t - k0).min(TILE);
            match n {
                1 => kquant_tile_n::<1>(job, r0, k0, out),
                2 => kquant_tile_n::<2>(job, r0, k0, out),
                3 => kquant_tile_n::<3>(job, r0, k0, out),
                4 => kquant_tile_n::<4>(job, r0, k0, out),
                5 => kquant_tile_n::<5>(job, r0, k0, out),
                6 => kquant_tile_n::<6>(job, r0, k0, out),
                7 => kquant_tile_n::<7>(job, r0, k0, out),
                _ => kquant_tile_n::<TILE>(job, r0, k0, out),
            }
            k0 += n;
        }
    }

    /// [`super::tile`] for `n ≤ TILE` activation rows, bit for bit.
    #[inline(always)]
    pub unsafe fn tile<B: Block>(job: &Job, r0: usize, k0: usize, n: usize, out: &mut [f32]) {
        match n {
            1 => tile_n::<B, 1>(job, r0, k0, out),
            2 => tile_n::<B, 2>(job, r0, k0, out),
            3 => tile_n::<B, 3>(job, r0, k0, out),
            4 => tile_n::<B, 4>(job, r0, k0, out),
            5 => tile_n::<B, 5>(job, r0, k0, out),
            6 => tile_n::<B, 6>(job, r0, k0, out),
            7 => tile_n::<B, 7>(job, r0, k0, out),
            _ => {
                assert_eq!(n, TILE);
                tile_n::<B, TILE>(job, r0, k0, out)
            }
        }
    }

    /// `N` activation rows from `k0` against weight rows `r0..`, the accumulators in registers.
    #[inline(always)]
    unsafe fn tile_n<B: Block, const N: usize>(job: &Job, r0: usize, k0: usize, out: &mut [f32]) {
        let (w, t, cols) = (job.w, job.t, job.w.cols);
        let x = &job.x[k0 * cols..(k0 + N) * cols];
        for (i, o) in out.chunks_mut(t).enumerate() {
            let mut a0 = [_mm512_setzero_ps(); N];
            let mut a1 = [_mm512_setzero_ps(); N];
            for (b, blk) in w.row(r0 + i).chunks_exact(B::BYTES).enumerate() {
                let (w0, w1) = B::weights512(blk);
                for k in 0..N {
                    let xb = x.as_ptr().add(k * cols + b * 32);
                    a0[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), a0[k]);
                    a1[k] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), a1[k]);
                }
            }
            for k in 0..N {
                o[k0 + k] = finish(lanes(a0[k]), lanes(a1[k]));
            }
        }
    }
}

const LANES: usize = 32;

/// Q4_K's 6-bit scale and min of sub-block `j` (candle's `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Sum of `N` (a power of two) lanes, pairwise (the same order on every instruction set).
#[inline(always)]
fn hsum<const N: usize>(a: [f32; N]) -> f32 {
    let mut v = a;
    let mut n = N;
    while n > 1 {
        n /= 2;
        for j in 0..n {
            v[j] += v[j + n];
        }
    }
    v[0]
}

/// `a · b` in 32 lanes, summed pairwise.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<FMA, LANES>(a, b)
}

/// `a · b` in `L` (a power of two) lanes, summed pairwise: the same order on every instruction
/// set, and vectorized by the compiler inside a function compiled for one.
#[inline(always)]
pub(crate) fn dot_lanes<const FMA: bool, const L: usize>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..L {
            acc[j] = madd::<FMA>(x[j], y[j], acc[j]);
        }
    }
    for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[j] = madd::<FMA>(*x, *y, acc[j]);
    }
    hsum(acc)
}

/// f16 → f32 by table (exact; one lookup per block).
static F16: LazyLock<Box<[f32; 65536]>> = LazyLock::new(|| {
    let v: Vec<f32> = (0..=u16::MAX).map(|b| half::f16::from_bits(b).to_f32()).collect();
    v.into_boxed_slice().try_into().unwrap()
});

#[inline(always)]
fn f16_at(table: &[f32; 65536], lo: u8, hi: u8) -> f32 {
    table[u16::from_le_bytes([lo, hi]) as usize]
}

/// [`dot_any`], or [`avx512`]'s fused kernel for the block types it has one for (Q4_K, Q6_K).
#[inline(always)]
fn dot_any_v<const FMA: bool, const V512: bool>(dtype: GgmlDType, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if V512 && matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) {
        // SAFETY: `V512` is only set in code compiled for (and run on) AVX-512.
        return unsafe { avx512::kquant_rows::<1>(dtype == GgmlDType::Q4K, row, x, x.len())[0] };
    }
    dot_any::<FMA>(dtype, row, x)
}

/// Any other block type: one block at a time through candle's `to_float` into a buffer that
/// stays in L1, then a dot product.
#[inline(always)]
fn dot_any<const FMA: bool>(dtype: GgmlDType, row: &[u8], x: &[f32]) -> f32 {
    let (bs, ts) = (dtype.block_size(), dtype.type_size());
    let mut buf = [0f32; 256];
    let mut total = 0f32;
    for (blk, xb) in row.chunks_exact(ts).zip(x.chunks_exact(bs)) {
        dequantize_row(dtype, blk, &mut buf[..bs]);
        total += dot::<FMA>(&buf[..bs], xb);
    }
    total
}

/// Dequantize whole blocks `bytes` of `dtype` into `out` with candle's own code (what
/// `QTensor::dequantize` runs, so these are the f32 path's weights).
pub fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    fn go<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        let n = bytes.len() / std::mem::size_of::<T>();
        assert!(bytes.len() == n * std::mem::size_of::<T>() && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: candle's block types are `repr(C)` plain data (integers and f16) valid for any
        // bytes; size and alignment were checked above.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
        T::to_float(blocks, out)
    }
    match dtype {
        GgmlDType::Q4_0 => go::<kq::BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => go::<kq::BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => go::<kq::BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => go::<kq::BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => go::<kq::BlockQ8_0>(bytes, out),
        GgmlDType::Q2K => go::<kq::BlockQ2K>(bytes, out),
        GgmlDType::Q3K => go::<kq::BlockQ3K>(bytes, out),
        GgmlDType::Q4K => go::<kq::BlockQ4K>(bytes, out),
        GgmlDType::Q5K => go::<kq::BlockQ5K>(bytes, out),
        GgmlDType::Q6K => go::<kq::BlockQ6K>(bytes, out),
        other => unreachable!("ExactLinear::new refuses {other:?}"),
    }
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: any u64 is 8 valid bytes; the length is the same memory.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as above, and any bytes are a valid u64.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
}
