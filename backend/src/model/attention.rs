//! Attention for a few query positions (decoding) on the CPU, fused: for each key/value head, the
//! scores of the query heads that share it against its cache, the soft cap, the mask, the softmax
//! and the weighted sum of the values, read in place from the cache (any strides, each key and
//! value row once for the whole group) without a matrix product call. candle's general path runs
//! two `gemm` calls, a scale, a softmax and the reshapes between them, each allocating, for one
//! query row against a few hundred keys; and a batch of steer streams holds a cache per row, which
//! it then reads once per query head.
//!
//! Each (batch row, key/value head) is computed on its own, so a row's result does not depend on
//! its batch.
//! The arithmetic is the general path's up to summation order; the same Rust is compiled for
//! AVX-512, AVX2+FMA and plain x86-64, as the exact kernels are, and picked at run time.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::exact::{dot_lanes, madd, Isa};
use crate::error::Result;

/// Query positions up to which [`attend`] takes the fused path (a decoding step is one).
pub const MAX_QUERIES: usize = 4;

/// Work (query positions × keys × head dim × heads) from which the heads run in parallel.
const PAR_WORK: usize = 1 << 16;

/// Scaled dot-product attention of `q` `[b, h, t, d]` over `k`, `v` `[b, h / n_rep, len, d]`
/// (views of a cache allowed), scores soft-capped first when asked, plus `mask` `[t, len]`: the
/// fused kernel when the tensors are f32 on the CPU and `t ≤ MAX_QUERIES`, `None` otherwise.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_rep: usize,
    scale: f64,
    softcap: Option<f32>,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (_, _, t, _) = q.dims4()?;
    let cpu_f32 = |x: &Tensor| matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32;
    if t > MAX_QUERIES || !cpu_f32(q) || !cpu_f32(k) || !cpu_f32(v) || k.stride().last() != Some(&1) || v.stride().last() != Some(&1) {
        return Ok(None);
    }
    let mask = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = Op { n_rep, scale: scale as f32, softcap, mask, isa: Isa::detect() };
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?))
}

struct Op {
    n_rep: usize,
    scale: f32,
    softcap: Option<f32>,
    /// `[t, len]`, added to the scores.
    mask: Option<Vec<f32>>,
    isa: Isa,
}

/// Where one tensor's `[b, h, pos, :]` rows start: its start offset and its first three strides.
#[derive(Clone, Copy)]
struct Strided {
    start: usize,
    s: [usize; 3],
}

impl Strided {
    fn at(self, b: usize, h: usize, pos: usize) -> usize {
        self.start + b * self.s[0] + h * self.s[1] + pos * self.s[2]
    }
}

fn strided(l: &Layout) -> candle_core::Result<Strided> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        candle_core::bail!("fused attention: a key/value layout with strides {st:?}")
    }
    Ok(Strided { start: l.start_offset(), s: [st[0], st[1], st[2]] })
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        "fused-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("fused attention: f32 tensors only")
        };
        let Some((q0, q1)) = ql.contiguous_offsets() else { candle_core::bail!("fused attention: queries must be contiguous") };
        let (b, h, t, d) = ql.shape().dims4()?;
        let (kb, kvh, len, kd) = kl.shape().dims4()?;
        if kb != b || kd != d || kvh * self.n_rep != h || vl.shape() != kl.shape() || self.mask.as_ref().is_some_and(|m| m.len() != t * len) {
            candle_core::bail!("fused attention: queries {:?}, keys {:?}, values {:?}", ql.shape(), kl.shape(), vl.shape())
        }
        let job = Job { op: self, q: &q[q0..q1], k, v, kl: strided(kl)?, vl: strided(vl)?, h, t, d, len };
        let mut out = vec![0f32; b * h * t * d];
        let run = |(i, o): (usize, &mut [f32])| {
            let mut scores = vec![0f32; self.n_rep * t * len];
            // SAFETY: `isa` is what `Isa::detect` found on this CPU.
            unsafe {
                match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => group_avx512(&job, i, o, &mut scores),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => group_avx2(&job, i, o, &mut scores),
                    _ => group::<false>(&job, i, o, &mut scores),
                }
            }
        };
        if b * kvh > 1 && b * h * t * len * d >= PAR_WORK {
            out.par_chunks_mut(self.n_rep * t * d).enumerate().for_each(run);
        } else {
            out.chunks_mut(self.n_rep * t * d).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }
}

struct Job<'a> {
    op: &'a Op,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    kl: Strided,
    vl: Strided,
    h: usize,
    t: usize,
    d: usize,
    len: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn group_avx512(job: &Job, i: usize, out: &mut [f32], scores: &mut [f32]) {
    group::<true>(job, i, out, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2(job: &Job, i: usize, out: &mut [f32], scores: &mut [f32]) {
    group::<true>(job, i, out, scores)
}

/// Key/value group `i` (= batch row × key/value heads + group): its `n_rep` query heads × `t`
/// positions, into `out` `[n_rep, t, d]`. Each key and value row is read once for all of them.
#[inline(always)]
fn group<const FMA: bool>(job: &Job, i: usize, out: &mut [f32], scores: &mut [f32]) {
    let (op, t, d, len) = (job.op, job.t, job.d, job.len);
    let kvh = job.h / op.n_rep;
    let (b, g) = (i / kvh, i % kvh);
    // The group's queries are consecutive: heads g·n_rep.. of row b, each `[t, d]`.
    let q = &job.q[i * op.n_rep * t * d..(i + 1) * op.n_rep * t * d];
    for j in 0..len {
        let k0 = job.kl.at(b, g, j);
        let key = &job.k[k0..k0 + d];
        for (r, qr) in q.chunks_exact(d).enumerate() {
            let mut x = dot::<FMA>(qr, key) * op.scale;
            if let Some(cap) = op.softcap {
                x = (x / cap).tanh() * cap;
            }
            if let Some(m) = &op.mask {
                x += m[(r % t) * len + j];
            }
            scores[r * len + j] = x;
        }
    }
    for row in scores.chunks_exact_mut(len) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        row.iter_mut().for_each(|s| *s /= sum);
    }
    out.fill(0.0);
    for j in 0..len {
        let v0 = job.vl.at(b, g, j);
        let value = &job.v[v0..v0 + d];
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let w = scores[r * len + j];
            for (o, &v) in o.iter_mut().zip(value) {
                *o = madd::<FMA>(w, v, *o);
            }
        }
    }
}

/// `a · b` in 16 lanes (a head dim is a multiple of 16 or small), summed pairwise.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<FMA, 16>(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::common::window_mask;

    /// candle's general path: the textbook form with every query head's own copy of its
    /// key/value head.
    fn textbook(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize, scale: f64, softcap: Option<f32>, mask: Option<&Tensor>) -> Tensor {
        let (kr, vr) = (
            candle_transformers::utils::repeat_kv(k.clone(), n_rep).unwrap().contiguous().unwrap(),
            candle_transformers::utils::repeat_kv(v.clone(), n_rep).unwrap().contiguous().unwrap(),
        );
        let mut att = (q.matmul(&kr.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(cap) = softcap {
            att = ((att / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap();
        }
        if let Some(m) = mask {
            att = att.broadcast_add(m).unwrap();
        }
        candle_nn::ops::softmax_last_dim(&att).unwrap().matmul(&vr).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn fused_attention_equals_the_textbook_form_on_every_instruction_set() {
        let dev = Device::Cpu;
        // Query positions 1 (decoding) to MAX_QUERIES; keys and values as views of a longer cache
        // (as the growing cache hands them out); grouped heads; a head dim that is not a multiple
        // of the lanes; soft cap and a sliding-window mask or neither.
        for (case, &(b, h, kvh, t, len, d, capped)) in
            [(1, 9, 3, 1, 170, 64, false), (16, 9, 3, 1, 40, 64, false), (2, 4, 1, 3, 300, 20, true), (3, 2, 2, MAX_QUERIES, 9, 8, true)]
                .iter()
                .enumerate()
        {
            let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
            let cache = |_| Tensor::randn(0f32, 1.0, (b, kvh, len + 5, d), &dev).unwrap().narrow(2, 0, len).unwrap();
            let (k, v) = (cache(0), cache(1));
            assert!(!k.is_contiguous());
            let mask = capped.then(|| window_mask(t, len - t, Some(len / 2), DType::F32, &dev).unwrap());
            let softcap = capped.then_some(30.0);
            let want = textbook(&q, &k, &v, h / kvh, 0.125, softcap, mask.as_ref());
            for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()) {
                let op = Op { n_rep: h / kvh, scale: 0.125, softcap, mask: mask.as_ref().map(|m| m.flatten_all().unwrap().to_vec1().unwrap()), isa };
                let got = q.apply_op3_no_bwd(&k, &v, &op).unwrap();
                let diff = max_diff(&got, &want);
                assert!(diff < 2e-6, "case {case} on {}: {diff}", isa.name());
            }
            // What `attend` picks for these tensors is the fused path.
            let got = attend(&q, &k, &v, h / kvh, 0.125, softcap, mask.as_ref()).unwrap().expect("fused");
            assert!(max_diff(&got, &want) < 2e-6);
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        let dev = Device::Cpu;
        let (h, kvh, len, d) = (9, 3, 200, 64);
        let q = Tensor::randn(0f32, 1.0, (16, h, 1, d), &dev).unwrap();
        let (k, v) = (Tensor::randn(0f32, 1.0, (16, kvh, len, d), &dev).unwrap(), Tensor::randn(0f32, 1.0, (16, kvh, len, d), &dev).unwrap());
        let all = attend(&q, &k, &v, h / kvh, 0.125, None, None).unwrap().unwrap();
        for r in [0, 7, 15] {
            let one = attend(&q.narrow(0, r, 1).unwrap(), &k.narrow(0, r, 1).unwrap(), &v.narrow(0, r, 1).unwrap(), h / kvh, 0.125, None, None)
                .unwrap()
                .unwrap();
            assert_eq!(
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                all.narrow(0, r, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn other_inputs_take_the_general_path() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, MAX_QUERIES + 1, 8), DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((1, 2, 9, 8), DType::F32, &dev).unwrap();
        assert!(attend(&q, &kv, &kv, 1, 1.0, None, None).unwrap().is_none());
        let q16 = Tensor::zeros((1, 2, 1, 8), DType::BF16, &dev).unwrap();
        let kv16 = kv.to_dtype(DType::BF16).unwrap();
        assert!(attend(&q16, &kv16, &kv16, 1, 1.0, None, None).unwrap().is_none());
    }
}
