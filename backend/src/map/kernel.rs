//! The fused neuron-map kernel: for each neuron direction `w` (a row of `dirs`), the logits
//! `W_U · w` over the whole vocabulary, reduced on the fly to the logsumexp and the top-k of both
//! polarities (`+logits` and `-logits`). Logits are produced tile by tile (a block of neurons ×
//! a block of the vocabulary, small enough to stay in cache) and scanned while hot; no
//! neurons × vocab matrix is ever materialised, so memory stays bounded whatever the model size.
//!
//! Two producers of logit tiles:
//! - **AMX** (Intel Sapphire Rapids and later, detected at run time): the product in bf16 tiles
//!   with the split-bf16 trick, a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi with f32 accumulation
//!   (~16 mantissa bits per product, where f32 has 24): logits, logsumexps and the top-k agree
//!   with an f64 brute force to ~1e-5 relative; only tokens whose logits tie within that can swap
//!   places. (An exact f32 rescoring of the candidates was tried: gathering their W_U rows cost a
//!   fifth of the run and changed nothing measurable.)
//! - **f32 gemm** (the `gemm` crate) everywhere else, or with `FLASH_INTERP_NO_AMX=1`.
//!
//! The scan uses AVX-512 where available (a vectorised exp), else portable code.
//!
//! Beside the logsumexp and the top-k, the scan keeps the first four central moments of each
//! neuron's logits over the vocabulary (per tile in f32 around the tile's mean, merged across
//! tiles in f64 with Pébay's formulas): the weight statistics of Gurnee et al. 2024's neuron
//! classes, at no extra pass over the vocabulary.

use rayon::prelude::*;

/// Reduction of one neuron in one polarity.
#[derive(Debug, Clone, PartialEq)]
pub struct PolarityReduction {
    /// logsumexp of all logits of this polarity.
    pub lse: f32,
    /// The k largest logits with their token ids, largest first.
    pub top: Vec<(f32, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeuronReduction {
    pub pos: PolarityReduction,
    pub neg: PolarityReduction,
    /// Moments of the positive-polarity logits (the negative polarity's are the same with the
    /// mean and the skew negated).
    pub moments: Moments,
}

/// A block of rows' reductions, flat, as the GPU hands them back: row `r`'s logsumexp of
/// polarity `p` (0: +x, 1: −x) at `lse[2r + p]`, its moments' mean, m2, m3 and m4 at
/// `mom[4r..4r + 4]`, and its top `k` of polarity `p` at `top_val` / `top_id[(2r + p)k..]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reductions {
    pub k: usize,
    /// Values per row (the moments' count).
    pub vocab: usize,
    pub lse: Vec<f32>,
    pub mom: Vec<f64>,
    pub top_val: Vec<f32>,
    pub top_id: Vec<u32>,
}

impl Reductions {
    pub fn rows(&self) -> usize {
        self.lse.len() / 2
    }

    /// Row by row reductions (all with the same `k`) laid out flat.
    pub fn from_rows(rows: &[NeuronReduction], k: usize, vocab: usize) -> Self {
        let mut f = Self { k, vocab, ..Self::default() };
        for r in rows {
            f.lse.extend([r.pos.lse, r.neg.lse]);
            f.mom.extend([r.moments.mean, r.moments.m2, r.moments.m3, r.moments.m4]);
            for p in [&r.pos, &r.neg] {
                assert_eq!(p.top.len(), k);
                f.top_val.extend(p.top.iter().map(|t| t.0));
                f.top_id.extend(p.top.iter().map(|t| t.1));
            }
        }
        f
    }

    pub fn moments(&self, r: usize) -> Moments {
        let m = &self.mom[4 * r..4 * r + 4];
        Moments { n: self.vocab as f64, mean: m[0], m2: m[1], m3: m[2], m4: m[3] }
    }
}

/// Count, mean and the central sums of powers 2, 3 and 4 of a stream of values, mergeable.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
    pub m3: f64,
    pub m4: f64,
}

impl Moments {
    /// The moments of one slice. Whole 16-value chunks: an approximate mean `c`, then the sums of
    /// powers 1 to 4 of `x - c` in 16 f32 lanes (centred first, so f32 keeps their precision),
    /// totalled in f64 and moved exactly onto the true mean `c + S1/n`. The few values left
    /// over: exactly, in f64. The two parts are then merged.
    pub fn of(xs: &[f32]) -> Self {
        let chunks = xs.chunks_exact(16);
        let rest = chunks.remainder();
        let nc = xs.len() - rest.len();
        let mut head = Self::default();
        if nc > 0 {
            let mut lanes = [0f32; 16];
            for c in xs[..nc].chunks_exact(16) {
                for (l, &x) in lanes.iter_mut().zip(c) {
                    *l += x;
                }
            }
            let c0 = (lanes.iter().map(|&x| x as f64).sum::<f64>() / nc as f64) as f32;
            let (mut s1, mut s2, mut s3, mut s4) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
            for c in xs[..nc].chunks_exact(16) {
                for j in 0..16 {
                    let d = c[j] - c0;
                    let d2 = d * d;
                    s1[j] += d;
                    s2[j] += d2;
                    s3[j] += d2 * d;
                    s4[j] += d2 * d2;
                }
            }
            let total = |s: [f32; 16]| s.iter().map(|&x| x as f64).sum::<f64>();
            head = Self::from_sums(nc as f64, c0 as f64, [total(s1), total(s2), total(s3), total(s4)]);
        }
        head.merge(Self::exact(rest))
    }

    /// The moments of `n` values from their sums of powers 1 to 4 of `x - c`: moved exactly onto
    /// the mean `c + δ`, δ = S1 / n.
    pub fn from_sums(n: f64, c: f64, [s1, s2, s3, s4]: [f64; 4]) -> Self {
        let d = s1 / n;
        // Separately rounded sums of a near-constant stream can leave tiny negative even moments.
        Self {
            n,
            mean: c + d,
            m2: (s2 - n * d * d).max(0.0),
            m3: s3 - 3.0 * d * s2 + 2.0 * n * d * d * d,
            m4: (s4 - 4.0 * d * s3 + 6.0 * d * d * s2 - 3.0 * n * d * d * d * d).max(0.0),
        }
    }

    /// The moments of a few values, in f64.
    pub fn exact(xs: &[f32]) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sum = |p: i32| xs.iter().map(|&x| (x as f64 - mean).powi(p)).sum::<f64>();
        Self { n, mean, m2: sum(2), m3: sum(3), m4: sum(4) }
    }

    /// Both streams together (Pébay 2008, the pairwise update of central sums).
    pub fn merge(self, b: Self) -> Self {
        let a = self;
        if a.n == 0.0 {
            return b;
        }
        if b.n == 0.0 {
            return a;
        }
        let n = a.n + b.n;
        let d = b.mean - a.mean;
        let (d2, d3, d4) = (d * d, d * d * d, d * d * d * d);
        Self {
            n,
            mean: a.mean + d * b.n / n,
            m2: a.m2 + b.m2 + d2 * a.n * b.n / n,
            m3: a.m3 + b.m3 + d3 * a.n * b.n * (a.n - b.n) / (n * n) + 3.0 * d * (a.n * b.m2 - b.n * a.m2) / n,
            m4: a.m4
                + b.m4
                + d4 * a.n * b.n * (a.n * a.n - a.n * b.n + b.n * b.n) / (n * n * n)
                + 6.0 * d2 * (a.n * a.n * b.m2 + b.n * b.n * a.m2) / (n * n)
                + 4.0 * d * (a.n * b.m3 - b.n * a.m3) / n,
        }
    }

    /// Population variance (0 for an empty or constant stream).
    pub fn variance(&self) -> f64 {
        if self.n > 0.0 {
            (self.m2 / self.n).max(0.0)
        } else {
            0.0
        }
    }
    /// Skewness, E[(x-μ)³] / σ³ (0 for a constant stream).
    pub fn skew(&self) -> f64 {
        let v = self.variance();
        if v > 0.0 {
            self.m3 / self.n / v.powf(1.5)
        } else {
            0.0
        }
    }
    /// Kurtosis, E[(x-μ)⁴] / σ⁴ (not the excess: a Gaussian has 3; 0 for a constant stream).
    pub fn kurtosis(&self) -> f64 {
        let v = self.variance();
        if v > 0.0 {
            self.m4 / self.n / (v * v)
        } else {
            0.0
        }
    }
}

/// Which producer `reduce` uses on this machine.
pub fn backend_name() -> &'static str {
    if amx::available() {
        "amx-bf16x3"
    } else {
        "f32-gemm"
    }
}

/// Reduce `n = dirs.len() / d` neuron directions (row-major `[n, d]`) against the unembedding
/// `wu` (row-major `[vocab, d]`), keeping the top `k` of each polarity. `on_rows(done)` reports
/// progress from worker threads.
pub fn reduce(dirs: &[f32], wu: &[f32], d: usize, k: usize, on_rows: &(dyn Fn(usize) + Sync)) -> Vec<NeuronReduction> {
    Reducer::new(wu, d).reduce(dirs, k, on_rows)
}

/// The unembedding prepared once (packed for AMX when used), reusable across layers.
pub struct Reducer<'a> {
    wu: &'a [f32],
    d: usize,
    vocab: usize,
    packed: Option<amx::PackedB>,
}

impl<'a> Reducer<'a> {
    pub fn new(wu: &'a [f32], d: usize) -> Self {
        Self::with_amx(wu, d, true)
    }

    /// `allow_amx = false` forces the f32 gemm path.
    pub fn with_amx(wu: &'a [f32], d: usize, allow_amx: bool) -> Self {
        assert!(d > 0 && wu.len().is_multiple_of(d));
        let vocab = wu.len() / d;
        let packed = (allow_amx && amx::available()).then(|| amx::PackedB::new(wu, d));
        Self { wu, d, vocab, packed }
    }

    pub fn reduce(&self, dirs: &[f32], k: usize, on_rows: &(dyn Fn(usize) + Sync)) -> Vec<NeuronReduction> {
        let d = self.d;
        assert!(dirs.len().is_multiple_of(d));
        assert!(k >= 1 && k <= self.vocab, "k = {k} must be in 1..={}", self.vocab);
        let rows = if self.packed.is_some() { amx::ROWS } else { gemm_path::ROWS };
        dirs.par_chunks(rows * d)
            .flat_map_iter(|block| {
                let out: Vec<NeuronReduction> = match &self.packed {
                    Some(p) => amx::tiles(block, d, p, self.vocab, k).into_iter().map(|a| a.finish(k)).collect(),
                    None => gemm_path::tiles(block, self.wu, d, self.vocab, k).into_iter().map(|a| a.finish(k)).collect(),
                };
                on_rows(out.len());
                out
            })
            .collect()
    }
}

/// Running top-k: candidates above a threshold are buffered and pruned to k now and then.
struct TopK {
    k: usize,
    thr: f32,
    cand: Vec<(f32, u32)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, thr: f32::NEG_INFINITY, cand: Vec::with_capacity(8 * k) }
    }
    fn prune(&mut self) {
        if self.cand.len() > self.k {
            self.cand.select_nth_unstable_by(self.k - 1, |a, b| b.0.total_cmp(&a.0));
            self.cand.truncate(self.k);
        }
        if self.cand.len() == self.k {
            self.thr = self.cand.iter().map(|c| c.0).fold(f32::INFINITY, f32::min);
        }
    }
    #[inline(always)]
    fn push(&mut self, v: f32, id: u32) {
        self.cand.push((v, id));
    }
    fn after_tile(&mut self) {
        if self.cand.len() >= 4 * self.k {
            self.prune();
        }
    }
    fn finish(mut self) -> Vec<(f32, u32)> {
        self.prune();
        self.cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        self.cand
    }
}

/// Online logsumexp: running max and the sum of exp(x − max).
#[derive(Clone, Copy)]
struct Lse {
    m: f32,
    s: f32,
}

impl Lse {
    fn new() -> Self {
        Self { m: f32::NEG_INFINITY, s: 0.0 }
    }
    #[inline(always)]
    fn raise(&mut self, tile_max: f32) {
        if tile_max > self.m {
            self.s *= (self.m - tile_max).exp();
            self.m = tile_max;
        }
    }
    fn value(&self) -> f32 {
        self.m + self.s.ln()
    }
}

/// Everything kept about one neuron while its logits stream past.
struct RowAcc {
    pos: Lse,
    neg: Lse,
    top_pos: TopK,
    top_neg: TopK,
    mom: Moments,
}

impl RowAcc {
    fn new(k: usize) -> Self {
        Self { pos: Lse::new(), neg: Lse::new(), top_pos: TopK::new(k), top_neg: TopK::new(k), mom: Moments::default() }
    }

    /// Fold a slice of logits (token ids `base..`) into the accumulator.
    fn scan(&mut self, xs: &[f32], base: u32) {
        #[cfg(target_arch = "x86_64")]
        if simd::has_avx512() {
            // SAFETY: AVX-512F is available, checked just above.
            unsafe { simd::scan_avx512(self, xs, base) };
            return;
        }
        self.scan_portable(xs, base);
    }

    fn scan_portable(&mut self, xs: &[f32], base: u32) {
        self.mom = self.mom.merge(Moments::of(xs));
        let mx = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mn = xs.iter().cloned().fold(f32::INFINITY, f32::min);
        self.pos.raise(mx);
        self.neg.raise(-mn);
        let (mp, mq) = (self.pos.m, self.neg.m);
        let (tp, tq) = (self.top_pos.thr, self.top_neg.thr);
        for (j, &x) in xs.iter().enumerate() {
            self.pos.s += (x - mp).exp();
            self.neg.s += (-x - mq).exp();
            if x > tp {
                self.top_pos.push(x, base + j as u32);
            }
            if -x > tq {
                self.top_neg.push(-x, base + j as u32);
            }
        }
        self.top_pos.after_tile();
        self.top_neg.after_tile();
    }

    fn finish(self, k: usize) -> NeuronReduction {
        let cut = |mut v: Vec<(f32, u32)>| {
            v.truncate(k);
            v
        };
        NeuronReduction {
            pos: PolarityReduction { lse: self.pos.value(), top: cut(self.top_pos.finish()) },
            neg: PolarityReduction { lse: self.neg.value(), top: cut(self.top_neg.finish()) },
            moments: self.mom,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::RowAcc;
    use std::arch::x86_64::*;

    use crate::vmath::avx512::exp16;
    pub use crate::vmath::has_avx512;

    /// The scan of `RowAcc::scan_portable`, 16 lanes at a time, with the moments of
    /// `Moments::of` taken in the same two passes (the first also sums, for the centre; the
    /// second accumulates the centred powers beside the exps).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scan_avx512(acc: &mut RowAcc, xs: &[f32], base: u32) {
        let n16 = xs.len() / 16 * 16;
        let (head, tail) = xs.split_at(n16);
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut vmin = _mm512_set1_ps(f32::INFINITY);
        let mut vsum = _mm512_setzero_ps();
        for c in head.chunks_exact(16) {
            // SAFETY: c has 16 floats.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            vmax = _mm512_max_ps(vmax, v);
            vmin = _mm512_min_ps(vmin, v);
            vsum = _mm512_add_ps(vsum, v);
        }
        let c0 = if n16 > 0 { _mm512_reduce_add_ps(vsum) / n16 as f32 } else { 0.0 };
        let vc0 = _mm512_set1_ps(c0);
        let (mut s1, mut s2, mut s3, mut s4) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        let mx = tail.iter().fold(_mm512_reduce_max_ps(vmax), |a, &b| a.max(b));
        let mn = tail.iter().fold(_mm512_reduce_min_ps(vmin), |a, &b| a.min(b));
        acc.pos.raise(mx);
        acc.neg.raise(-mn);
        let (mp, mq) = (_mm512_set1_ps(acc.pos.m), _mm512_set1_ps(acc.neg.m));
        let (tp, tq) = (acc.top_pos.thr, acc.top_neg.thr);
        let (vtp, vtq) = (_mm512_set1_ps(tp), _mm512_set1_ps(-tq));
        let mut sp = _mm512_setzero_ps();
        let mut sq = _mm512_setzero_ps();
        for (ci, c) in head.chunks_exact(16).enumerate() {
            // SAFETY: c has 16 floats.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            let d = _mm512_sub_ps(v, vc0);
            let d2 = _mm512_mul_ps(d, d);
            s1 = _mm512_add_ps(s1, d);
            s2 = _mm512_add_ps(s2, d2);
            s3 = _mm512_fmadd_ps(d2, d, s3);
            s4 = _mm512_fmadd_ps(d2, d2, s4);
            sp = _mm512_add_ps(sp, exp16(_mm512_sub_ps(v, mp)));
            sq = _mm512_add_ps(sq, exp16(_mm512_sub_ps(_mm512_sub_ps(_mm512_setzero_ps(), v), mq)));
            let mut above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, vtp);
            let mut below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, vtq);
            let id0 = base + (ci * 16) as u32;
            while above != 0 {
                let j = above.trailing_zeros() as usize;
                acc.top_pos.push(c[j], id0 + j as u32);
                above &= above - 1;
            }
            while below != 0 {
                let j = below.trailing_zeros() as usize;
                acc.top_neg.push(-c[j], id0 + j as u32);
                below &= below - 1;
            }
        }
        acc.pos.s += _mm512_reduce_add_ps(sp);
        acc.neg.s += _mm512_reduce_add_ps(sq);
        if n16 > 0 {
            let total = |s: __m512| {
                let mut a = [0f32; 16];
                // SAFETY: a has 16 floats.
                unsafe { _mm512_storeu_ps(a.as_mut_ptr(), s) };
                a.iter().map(|&x| x as f64).sum::<f64>()
            };
            let m = super::Moments::from_sums(n16 as f64, c0 as f64, [total(s1), total(s2), total(s3), total(s4)]);
            acc.mom = acc.mom.merge(m);
        }
        acc.mom = acc.mom.merge(super::Moments::exact(tail));
        for (j, &x) in tail.iter().enumerate() {
            acc.pos.s += (x - acc.pos.m).exp();
            acc.neg.s += (-x - acc.neg.m).exp();
            let id = base + (n16 + j) as u32;
            if x > tp {
                acc.top_pos.push(x, id);
            }
            if -x > tq {
                acc.top_neg.push(-x, id);
            }
        }
        acc.top_pos.after_tile();
        acc.top_neg.after_tile();
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn has_avx512() -> bool {
        false
    }
}

/// The portable producer: f32 tiles from the `gemm` crate, single-threaded per task.
mod gemm_path {
    use super::RowAcc;

    pub const ROWS: usize = 96;
    const COLS: usize = 1024;

    pub fn tiles(block: &[f32], wu: &[f32], d: usize, vocab: usize, k: usize) -> Vec<RowAcc> {
        let rows = block.len() / d;
        let mut tile = vec![0f32; rows * COLS];
        let mut accs: Vec<RowAcc> = (0..rows).map(|_| RowAcc::new(k)).collect();
        let mut t0 = 0;
        while t0 < vocab {
            let cols = COLS.min(vocab - t0);
            // tile[r, j] = Σ_c block[r, c] · wu[t0 + j, c]
            // SAFETY: the pointers address live slices with these strides and extents:
            // dst rows × cols (row stride COLS), lhs rows × d, rhs d × cols from wu rows t0...
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    d,
                    tile.as_mut_ptr(),
                    1,
                    COLS as isize,
                    false,
                    block.as_ptr(),
                    1,
                    d as isize,
                    wu.as_ptr().add(t0 * d),
                    d as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (r, acc) in accs.iter_mut().enumerate() {
                acc.scan(&tile[r * COLS..r * COLS + cols], t0 as u32);
            }
            t0 += cols;
        }
        accs
    }
}

/// The AMX producer (x86-64 with AMX-TILE and AMX-BF16; Linux).
mod amx {
    use super::RowAcc;

    /// Neurons per task, and tokens per chunk: the chunk's B tiles (hi and lo, ~590 KB for
    /// d = 576) stay in L2 while every 32-row group of the task's neurons passes over them.
    pub const ROWS: usize = 256;
    const CHUNK: usize = 256;

    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| std::env::var_os("FLASH_INTERP_NO_AMX").is_none() && imp::enable())
    }

    /// bf16 of `x`, rounded to nearest even.
    fn bf16(x: f32) -> u16 {
        let b = x.to_bits();
        ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
    fn f32_of(h: u16) -> f32 {
        f32::from_bits((h as u32) << 16)
    }
    /// x ≈ hi + lo, both bf16.
    fn split(x: f32) -> (u16, u16) {
        let hi = bf16(x);
        (hi, bf16(x - f32_of(hi)))
    }

    /// The unembedding as B tiles in AMX's pair-interleaved layout: for each block of 16 tokens
    /// and each step of 32 features, a 16 × 32 bf16 tile (1 KiB), hi and lo parts.
    pub struct PackedB {
        hi: Vec<u16>,
        lo: Vec<u16>,
        ksteps: usize,
        dpad: usize,
    }

    impl PackedB {
        pub fn new(wu: &[f32], d: usize) -> Self {
            let vocab = wu.len() / d;
            let dpad = d.div_ceil(32) * 32;
            let ksteps = dpad / 32;
            let vblocks = vocab.div_ceil(32) * 2; // whole pairs of 16-token blocks
            let mut hi = vec![0u16; vblocks * ksteps * 512];
            let mut lo = vec![0u16; vblocks * ksteps * 512];
            for v in 0..vocab {
                let (vb, n) = (v / 16, v % 16);
                for c in 0..d {
                    let (ks, kk) = (c / 32, c % 32);
                    let at = (vb * ksteps + ks) * 512 + (kk / 2) * 32 + n * 2 + (kk % 2);
                    let (h, l) = split(wu[v * d + c]);
                    hi[at] = h;
                    lo[at] = l;
                }
            }
            Self { hi, lo, ksteps, dpad }
        }
    }

    /// Stream the logits of one block of neurons through row accumulators.
    pub fn tiles(block: &[f32], d: usize, b: &PackedB, vocab: usize, k: usize) -> Vec<RowAcc> {
        let rows = block.len() / d;
        let groups = rows.div_ceil(32);
        let mut a_hi = vec![0u16; groups * 32 * b.dpad];
        let mut a_lo = vec![0u16; groups * 32 * b.dpad];
        for r in 0..rows {
            for c in 0..d {
                let (h, l) = split(block[r * d + c]);
                a_hi[r * b.dpad + c] = h;
                a_lo[r * b.dpad + c] = l;
            }
        }
        let mut accs: Vec<RowAcc> = (0..rows).map(|_| RowAcc::new(k)).collect();
        let mut buf = vec![0f32; groups * 32 * CHUNK];
        imp::with_tiles(|| {
            let mut t0 = 0;
            while t0 < vocab {
                let cols = CHUNK.min(vocab - t0);
                for g in 0..groups {
                    let (ah, al) = (&a_hi[g * 32 * b.dpad..], &a_lo[g * 32 * b.dpad..]);
                    let out = &mut buf[g * 32 * CHUNK..];
                    for p in 0..cols.div_ceil(32) {
                        // SAFETY: tiles are configured (with_tiles); every pointer addresses 16
                        // rows of 64 bytes at the given stride inside a live buffer.
                        unsafe { imp::block32(ah, al, b, t0 / 16 + 2 * p, out, p * 32, CHUNK) };
                    }
                }
                for (r, acc) in accs.iter_mut().enumerate() {
                    acc.scan(&buf[r * CHUNK..r * CHUNK + cols], t0 as u32);
                }
                t0 += cols;
            }
        });
        accs
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    mod imp {
        use super::PackedB;
        use std::arch::asm;

        /// Ask Linux for the AMX tile state (once per process) if the CPU has AMX-TILE and AMX-BF16.
        pub fn enable() -> bool {
            // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain syscall with integer arguments.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        }

        /// Run `f` with all 8 tiles configured as 16 rows × 64 bytes; release them after.
        pub fn with_tiles(f: impl FnOnce()) {
            let mut cfg = [0u8; 64];
            cfg[0] = 1; // palette 1
            for t in 0..8 {
                cfg[16 + 2 * t] = 64; // bytes per row
                cfg[48 + t] = 16; // rows
            }
            // SAFETY: AMX was enabled (available()); cfg is a valid 64-byte tile configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack)) };
            f();
            // SAFETY: releases the tile state configured above.
            unsafe { asm!("tilerelease", options(nostack)) };
        }

        macro_rules! load {
            ($t:literal, $p:expr, $stride:expr) => {
                asm!(concat!("tileloadd tmm", $t, ", [{0} + {1}*1]"), in(reg) $p, in(reg) $stride, options(nostack))
            };
        }
        macro_rules! dp {
            ($c:literal, $a:literal, $b:literal) => {
                asm!(concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b), options(nostack))
            };
        }
        macro_rules! store {
            ($t:literal, $p:expr, $stride:expr) => {
                asm!(concat!("tilestored [{0} + {1}*1], tmm", $t), in(reg) $p, in(reg) $stride, options(nostack))
            };
        }

        /// Logits of 32 neurons × 32 tokens (token blocks vb, vb+1) into `out[r, col0..col0+32]`.
        /// tmm0-3: C (2×2), tmm4-5: A rows 0-15 / 16-31, tmm6-7: B tokens 0-15 / 16-31.
        pub unsafe fn block32(a_hi: &[u16], a_lo: &[u16], b: &PackedB, vb: usize, out: &mut [f32], col0: usize, ld: usize) {
            let a_stride = (b.dpad * 2) as isize;
            let b_stride = 64isize;
            unsafe {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
                for ks in 0..b.ksteps {
                    let ah0 = a_hi.as_ptr().add(ks * 32);
                    let ah1 = a_hi.as_ptr().add(16 * b.dpad + ks * 32);
                    let al0 = a_lo.as_ptr().add(ks * 32);
                    let al1 = a_lo.as_ptr().add(16 * b.dpad + ks * 32);
                    let bo0 = (vb * b.ksteps + ks) * 512;
                    let bo1 = ((vb + 1) * b.ksteps + ks) * 512;
                    // hi · hi
                    load!("4", ah0, a_stride);
                    load!("5", ah1, a_stride);
                    load!("6", b.hi.as_ptr().add(bo0), b_stride);
                    load!("7", b.hi.as_ptr().add(bo1), b_stride);
                    dp!("0", "4", "6");
                    dp!("1", "4", "7");
                    dp!("2", "5", "6");
                    dp!("3", "5", "7");
                    // lo · hi
                    load!("4", al0, a_stride);
                    load!("5", al1, a_stride);
                    dp!("0", "4", "6");
                    dp!("1", "4", "7");
                    dp!("2", "5", "6");
                    dp!("3", "5", "7");
                    // hi · lo
                    load!("4", ah0, a_stride);
                    load!("5", ah1, a_stride);
                    load!("6", b.lo.as_ptr().add(bo0), b_stride);
                    load!("7", b.lo.as_ptr().add(bo1), b_stride);
                    dp!("0", "4", "6");
                    dp!("1", "4", "7");
                    dp!("2", "5", "6");
                    dp!("3", "5", "7");
                }
                let ld_bytes = (ld * 4) as isize;
                let o = out.as_mut_ptr();
                store!("0", o.add(col0), ld_bytes);
                store!("1", o.add(col0 + 16), ld_bytes);
                store!("2", o.add(16 * ld + col0), ld_bytes);
                store!("3", o.add(16 * ld + col0 + 16), ld_bytes);
            }
        }
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    mod imp {
        use super::PackedB;
        pub fn enable() -> bool {
            false
        }
        pub fn with_tiles(_f: impl FnOnce()) {
            unreachable!("AMX is never enabled on this platform")
        }
        pub unsafe fn block32(_: &[u16], _: &[u16], _: &PackedB, _: usize, _: &mut [f32], _: usize, _: usize) {
            unreachable!("AMX is never enabled on this platform")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, d: usize, vocab: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut s = seed;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
        };
        let dirs: Vec<f32> = (0..n * d).map(|_| rnd()).collect();
        let wu: Vec<f32> = (0..vocab * d).map(|_| rnd()).collect();
        (dirs, wu)
    }

    /// Brute force in f64: every logit, full logsumexp, full sort.
    fn check(got: &[NeuronReduction], dirs: &[f32], wu: &[f32], d: usize, k: usize, lse_tol: f64) {
        assert!(got.iter().all(|g| g.pos.top.len() == k && g.neg.top.len() == k));
        let vocab = wu.len() / d;
        for (i, g) in got.iter().enumerate() {
            let logits: Vec<f64> = (0..vocab).map(|t| (0..d).map(|c| dirs[i * d + c] as f64 * wu[t * d + c] as f64).sum()).collect();
            // Error bound of a split-bf16 product (2^-16 per term, doubled): 2^-15 · Σ|a·b|.
            let tol: Vec<f64> =
                (0..vocab).map(|t| 1e-6 + (0..d).map(|c| (dirs[i * d + c] as f64 * wu[t * d + c] as f64).abs()).sum::<f64>() / 32768.0).collect();
            for (sign, red) in [(1.0, &g.pos), (-1.0, &g.neg)] {
                let v: Vec<f64> = logits.iter().map(|x| sign * x).collect();
                let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                assert!((red.lse as f64 - lse).abs() < lse_tol, "neuron {i} sign {sign}: lse {} vs {lse}", red.lse);
                if sign > 0.0 {
                    // Moments against the two-pass f64 formulas over every logit.
                    let n = vocab as f64;
                    let mean = v.iter().sum::<f64>() / n;
                    let c = |p: i32| v.iter().map(|x| (x - mean).powi(p)).sum::<f64>() / n;
                    let (var, skew, kurt) = (c(2), c(3) / c(2).powf(1.5), c(4) / (c(2) * c(2)));
                    let mo = &g.moments;
                    assert_eq!(mo.n, n);
                    assert!((mo.mean - mean).abs() < 1e-4 * var.sqrt(), "neuron {i}: mean {} vs {mean}", mo.mean);
                    assert!((mo.variance() - var).abs() < 1e-4 * var, "neuron {i}: var {} vs {var}", mo.variance());
                    assert!((mo.skew() - skew).abs() < 1e-3, "neuron {i}: skew {} vs {skew}", mo.skew());
                    assert!((mo.kurtosis() - kurt).abs() < 1e-3 * kurt, "neuron {i}: kurtosis {} vs {kurt}", mo.kurtosis());
                }
                let mut idx: Vec<usize> = (0..vocab).collect();
                idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
                // Same tokens in the same order, except that tokens whose logits tie within the
                // error bound may swap; every logit within its bound of the brute force.
                for (pos, (t, &j)) in red.top.iter().zip(&idx).enumerate() {
                    let id = t.1 as usize;
                    assert!((t.0 as f64 - v[id]).abs() < tol[id], "neuron {i} sign {sign} rank {pos}: {} vs {}", t.0, v[id]);
                    assert!(id == j || (v[id] - v[j]).abs() < tol[id] + tol[j], "neuron {i} sign {sign} rank {pos}");
                }
            }
        }
    }

    #[test]
    fn reduce_matches_brute_force() {
        // Sizes that are not multiples of any tile: 70 neurons, d = 40, vocab = 2500.
        let (d, k) = (40, 100);
        let (dirs, wu) = data(70, d, 2500, 12345);
        for allow_amx in [true, false] {
            let got = Reducer::with_amx(&wu, d, allow_amx).reduce(&dirs, k, &|_| {});
            check(&got, &dirs, &wu, d, k, 1e-4);
        }
    }

    #[test]
    fn moments_merge_like_one_pass_even_far_from_zero() {
        // Streams with a large offset and a heavy tail, cut at awkward places: the merged
        // moments equal the two-pass f64 moments of the whole.
        let (xs, _) = data(1, 5000, 1, 3);
        let xs: Vec<f32> = xs.iter().enumerate().map(|(i, x)| 40.0 + x + if i % 97 == 0 { 9.0 } else { 0.0 }).collect();
        let want = Moments::exact(&xs);
        for cut in [1, 15, 16, 17, 333, 1024, 4999] {
            let got = xs.chunks(cut).fold(Moments::default(), |m, c| m.merge(Moments::of(c)));
            assert!((got.mean - want.mean).abs() < 1e-9 * want.mean, "cut {cut}");
            assert!((got.variance() / want.variance() - 1.0).abs() < 1e-4, "cut {cut}: {} vs {}", got.variance(), want.variance());
            assert!((got.skew() - want.skew()).abs() < 1e-3, "cut {cut}: {} vs {}", got.skew(), want.skew());
            assert!((got.kurtosis() / want.kurtosis() - 1.0).abs() < 1e-4, "cut {cut}: {} vs {}", got.kurtosis(), want.kurtosis());
        }
        assert!(want.skew() > 1.0 && want.kurtosis() > 5.0, "the test stream is skewed and heavy-tailed");
    }

    #[test]
    fn portable_and_simd_scans_agree() {
        let (xs, _) = data(1, 1000, 1, 9);
        let xs: Vec<f32> = xs.iter().map(|x| x * 8.0).collect();
        let mut a = RowAcc::new(20);
        let mut b = RowAcc::new(20);
        for (i, c) in xs.chunks(333).enumerate() {
            a.scan(c, (i * 333) as u32);
            b.scan_portable(c, (i * 333) as u32);
        }
        let (a, b) = (a.finish(20), b.finish(20));
        assert_eq!(a.pos.top, b.pos.top);
        assert_eq!(a.neg.top, b.neg.top);
        assert!((a.pos.lse - b.pos.lse).abs() < 1e-5 && (a.neg.lse - b.neg.lse).abs() < 1e-5);
        let want = Moments::exact(&xs);
        for m in [a.moments, b.moments] {
            assert_eq!(m.n, want.n);
            assert!((m.mean - want.mean).abs() < 1e-6 * want.variance().sqrt());
            assert!((m.variance() / want.variance() - 1.0).abs() < 1e-5);
            assert!((m.skew() - want.skew()).abs() < 1e-4 && (m.kurtosis() / want.kurtosis() - 1.0).abs() < 1e-5);
        }
    }
}
