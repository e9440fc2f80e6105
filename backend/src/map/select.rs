//! The GPU map's row reduction, as plain Rust: the CPU twin of `kernels/map.cu`, step for step.
//! The GPU computes one neuron's logits over the whole vocabulary with cuBLAS, then one thread
//! block reduces that row; this module is the same algorithm for one row, so that the algorithm
//! (the histogram, the radix select, its ties, the merges) is tested on every machine, GPU or not.
//!
//! For one row of logits `x` (length V ≥ k):
//! 1. **Statistics and a histogram in one pass.** Thread `t` of [`THREADS`] reads `x[t],
//!    x[t + THREADS], …` and keeps an online logsumexp of `+x` and of `−x` (running max and the
//!    sum of exp(v − max)) and the sums of powers 1–4 of `x − c`, `c` its first value, in f32.
//!    The threads' parts are merged: logsumexps by rescaling, moments in f64 with Pébay's
//!    formulas ([`Moments::merge`]). Each float maps to a `u32` key with the same order ([`key`];
//!    `−x`'s key is `!key(x)`), and the pass counts the keys' top [`HBITS`] bits (sign, exponent,
//!    3 bits of mantissa) in one histogram; `−x`'s histogram is the same one read backwards.
//! 2. **The k-th's bin.** For each polarity, the bin holding its k-th largest key, and how many
//!    keys lie in or above it (the candidates).
//! 3. **a. Candidates sorted** (when neither polarity has more than [`CAP`]: nearly every row of
//!    a real model, a few hundred candidates): a second pass gathers the candidates, and a sort
//!    by key, largest first, ties by token id, puts the top k first. Two reads of the row.
//!
//!    **b. Radix select** otherwise (wide ties; logits far from zero, where one bin holds most
//!    keys): four passes of 8 bits, most significant first, count the keys that share the
//!    prefix found so far in 256 bins and find the exact key `K` of the k-th largest and how
//!    many keys equal to `K` belong to the top k (`need`); a gather takes every key above `K`
//!    and the first `need` keys equal to `K` in vocabulary order; a sort as in (a). Six reads.
//!
//! Both polarities go through each pass together; both paths give the same top k.

use super::kernel::{Moments, NeuronReduction, PolarityReduction};

/// Threads per block in the kernel (and threads emulated here for step 1).
pub const THREADS: usize = 256;
/// The largest k the kernel's shared buffers hold.
pub const MAX_K: usize = 128;
/// Bits of each key step 1's histogram counts.
pub const HBITS: u32 = 12;
/// The most candidates per polarity step 3a sorts (in the kernel's shared memory).
pub const CAP: usize = 1024;

/// A `u32` with the order of the float (−0.0 below +0.0; no NaN in logits): larger float, larger
/// key. The key of `−x` is `!key(x)`.
#[inline]
pub fn key(x: f32) -> u32 {
    let u = x.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The float of a key.
#[inline]
pub fn value(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 { key & 0x7fff_ffff } else { !key })
}

/// Running logsumexp: max and the sum of exp(v − max) (sum 0: nothing seen).
#[derive(Clone, Copy)]
struct Lse {
    m: f32,
    s: f32,
}

impl Lse {
    const EMPTY: Self = Self { m: f32::NEG_INFINITY, s: 0.0 };
    #[inline]
    fn push(&mut self, v: f32) {
        if v == f32::NEG_INFINITY {
            return;
        }
        if v > self.m {
            self.s = self.s * (self.m - v).exp() + 1.0;
            self.m = v;
        } else {
            self.s += (v - self.m).exp();
        }
    }
    fn merge(self, o: Self) -> Self {
        if o.s == 0.0 {
            return self;
        }
        if self.s == 0.0 {
            return o;
        }
        let m = self.m.max(o.m);
        Self { m, s: self.s * (self.m - m).exp() + o.s * (o.m - m).exp() }
    }
    fn value(self) -> f32 {
        self.m + self.s.ln()
    }
}

/// Step 3b's select: the key of the k-th largest of `keys` and how many keys equal to it are in
/// the top k.
pub fn radix_select(keys: &[u32], k: usize) -> (u32, usize) {
    assert!(k >= 1 && k <= keys.len());
    let (mut prefix, mut mask, mut remaining) = (0u32, 0u32, k);
    for shift in [24u32, 16, 8, 0] {
        let mut hist = [0usize; 256];
        for &kk in keys.iter().filter(|&&kk| kk & mask == prefix) {
            hist[((kk >> shift) & 255) as usize] += 1;
        }
        let mut digit = 255;
        while digit > 0 && hist[digit] < remaining {
            remaining -= hist[digit];
            digit -= 1;
        }
        prefix |= (digit as u32) << shift;
        mask |= 255 << shift;
    }
    (prefix, remaining)
}

/// Step 3b's gather and sort: the top k of `keys` (given `K` and `need` from [`radix_select`]) as
/// (key, id), largest first, ties by id.
pub fn gather_sorted(keys: &[u32], k: usize, (kth, need): (u32, usize)) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = keys.iter().enumerate().filter(|(_, &kk)| kk > kth).map(|(i, &kk)| (kk, i as u32)).collect();
    assert_eq!(out.len(), k - need, "the select's count of keys above the k-th");
    out.extend(keys.iter().enumerate().filter(|(_, &kk)| kk == kth).take(need).map(|(i, &kk)| (kk, i as u32)));
    out.sort_by(largest_first);
    out
}

/// The order of the top k: larger key first, ties by smaller token id.
fn largest_first(a: &(u32, u32), b: &(u32, u32)) -> std::cmp::Ordering {
    b.0.cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Step 2: the bin (of [`HBITS`]-bit prefixes, counted in `bins`) of the k-th largest key, and
/// how many keys lie in or above it: `from_top` for `+x`; for `−x`, whose keys are the
/// complements, the bins are read from the bottom (and the bin is given in `+x`'s numbering).
pub fn kth_bin(bins: &[usize], k: usize, from_top: bool) -> (usize, usize) {
    let mut n = 0;
    for b in (0..bins.len()).map(|i| if from_top { bins.len() - 1 - i } else { i }) {
        n += bins[b];
        if n >= k {
            return (b, n);
        }
    }
    unreachable!("k = {k} is more than the {n} keys counted")
}

/// The whole reduction of one row of logits, as the kernel does it.
pub fn reduce_row(x: &[f32], k: usize) -> NeuronReduction {
    reduce_row_path(x, k).0
}

/// [`reduce_row`], and whether the row took step 3b (the radix select) rather than 3a.
pub fn reduce_row_path(x: &[f32], k: usize) -> (NeuronReduction, bool) {
    assert!(k >= 1 && k <= x.len() && k <= MAX_K);
    // Step 1, thread by thread, then the threads merged.
    let (mut pos, mut neg, mut moments) = (Lse::EMPTY, Lse::EMPTY, Moments::default());
    for t in 0..THREADS.min(x.len()) {
        let (mut p, mut q) = (Lse::EMPTY, Lse::EMPTY);
        let c = x[t];
        let (mut s, mut n) = ([0f32; 4], 0usize);
        for &v in x[t..].iter().step_by(THREADS) {
            p.push(v);
            q.push(-v);
            let d = v - c;
            let d2 = d * d;
            s[0] += d;
            s[1] += d2;
            s[2] += d2 * d;
            s[3] += d2 * d2;
            n += 1;
        }
        pos = pos.merge(p);
        neg = neg.merge(q);
        moments = moments.merge(Moments::from_sums(n as f64, c as f64, s.map(|v| v as f64)));
    }
    let keys: Vec<u32> = x.iter().map(|&v| key(v)).collect();
    let bin = |kk: u32| (kk >> (32 - HBITS)) as usize;
    let mut bins = vec![0usize; 1 << HBITS];
    for &kk in &keys {
        bins[bin(kk)] += 1;
    }
    // Step 2.
    let ((bpos, cpos), (bneg, cneg)) = (kth_bin(&bins, k, true), kth_bin(&bins, k, false));
    let radix = cpos > CAP || cneg > CAP;
    let neg_keys: Vec<u32> = keys.iter().map(|&kk| !kk).collect();
    let top = |keys: &[u32], candidate: &dyn Fn(u32) -> bool| -> Vec<(f32, u32)> {
        let sorted = if radix {
            // Step 3b.
            gather_sorted(keys, k, radix_select(keys, k))
        } else {
            // Step 3a (a candidate is judged by its +x key, as the kernel does).
            let mut c: Vec<(u32, u32)> = keys.iter().enumerate().filter(|(_, &kk)| candidate(kk)).map(|(i, &kk)| (kk, i as u32)).collect();
            c.sort_by(largest_first);
            c.truncate(k);
            c
        };
        sorted.into_iter().map(|(kk, id)| (value(kk), id)).collect()
    };
    let r = NeuronReduction {
        pos: PolarityReduction { lse: pos.value(), top: top(&keys, &|kk| bin(kk) >= bpos) },
        neg: PolarityReduction { lse: neg.value(), top: top(&neg_keys, &|kk| bin(!kk) <= bneg) },
        moments,
    };
    (r, radix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The top k by brute force: sort everything (by value, ties by id).
    fn brute_top(x: &[f32], k: usize) -> Vec<(f32, u32)> {
        let mut all: Vec<(f32, u32)> = x.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }

    fn brute_lse(x: impl Iterator<Item = f32> + Clone) -> f64 {
        let m = x.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.map(|v| (v as f64 - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn keys_keep_the_order_of_floats_and_negate_by_not() {
        let xs = [f32::NEG_INFINITY, -3.5e30, -2.0, -1e-40, -0.0, 0.0, 1e-40, 0.5, 1.0, 7e20, f32::INFINITY];
        for w in xs.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} < {}", w[0], w[1]);
        }
        for &x in &xs {
            assert_eq!(value(key(x)).to_bits(), x.to_bits());
            assert_eq!(key(-x), !key(x));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The select, the gather and the sort give exactly the brute-force top k, ties included
        /// (values drawn from a few levels, so ties at the k-th place are common).
        #[test]
        fn top_k_is_exact_with_ties(levels in 1usize..6, seed in any::<u64>(), n in 1usize..3000, k in 1usize..=MAX_K) {
            let k = k.min(n);
            let mut s = seed;
            let x: Vec<f32> = (0..n).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = (s >> 33) as usize;
                if levels == 1 { (r as f32 / 2f32.powi(31)) * 20.0 - 10.0 } else { (r % levels) as f32 - 1.5 }
            }).collect();
            let r = reduce_row(&x, k);
            prop_assert_eq!(&r.pos.top, &brute_top(&x, k));
            let neg: Vec<f32> = x.iter().map(|v| -v).collect();
            prop_assert_eq!(&r.neg.top, &brute_top(&neg, k));
        }
    }

    /// Rows of both kinds take the path meant for them, and both give the brute-force top k: a
    /// few hundred candidates sort in shared memory; a wide tie or logits far from zero (one
    /// histogram bin holding most of the row) take the radix select.
    #[test]
    fn each_path_is_taken_where_it_should_be_and_is_exact() {
        let unit = |i: usize| ((i as f32 * 0.754_877_7).fract() - 0.5) * 2.0;
        let rows: [(&str, Vec<f32>, bool); 5] = [
            ("logit-like", (0..20_000).map(|i| unit(i) * 3.0 + if i % 401 == 0 { 4.0 } else { 0.0 }).collect(), false),
            ("few candidates, short", (0..300).map(unit).collect(), false),
            ("four levels", (0..6_000).map(|i| ((i * 7919) % 4) as f32 - 1.5).collect(), true),
            ("all equal", vec![0.25; 2_000], true),
            ("far from zero", (0..5_000).map(|i| 30.0 + unit(i) * 0.01).collect(), true),
        ];
        for (what, x, radix) in rows {
            let (r, took) = reduce_row_path(&x, 100);
            assert_eq!(took, radix, "{what}: radix select");
            assert_eq!(r.pos.top, brute_top(&x, 100), "{what}");
            let neg: Vec<f32> = x.iter().map(|v| -v).collect();
            assert_eq!(r.neg.top, brute_top(&neg, 100), "{what}");
        }
    }

    /// Logsumexps and moments against f64 brute force on logit-like rows longer than the threads.
    #[test]
    fn statistics_match_brute_force() {
        for (n, scale, shift) in [(5usize, 1.0f32, 0.0f32), (300, 3.0, -2.0), (49_152, 4.0, 1.5), (70_001, 0.01, 30.0)] {
            let x: Vec<f32> = (0..n).map(|i| ((i as f32 * 0.7548776).fract() - 0.5) * scale + shift + if i % 977 == 0 { 6.0 } else { 0.0 }).collect();
            let r = reduce_row(&x, 5.min(n));
            let lp = brute_lse(x.iter().copied());
            let ln = brute_lse(x.iter().map(|v| -v));
            assert!((r.pos.lse as f64 - lp).abs() <= 1e-5 * lp.abs().max(1.0), "{n}: {} vs {lp}", r.pos.lse);
            assert!((r.neg.lse as f64 - ln).abs() <= 1e-5 * ln.abs().max(1.0), "{n}: {} vs {ln}", r.neg.lse);
            let want = Moments::exact(&x);
            let m = r.moments;
            assert_eq!(m.n, want.n);
            assert!((m.mean - want.mean).abs() <= 1e-6 * want.mean.abs().max(scale as f64), "{n}: mean {} vs {}", m.mean, want.mean);
            for (got, want) in [(m.variance(), want.variance()), (m.skew(), want.skew()), (m.kurtosis(), want.kurtosis())] {
                assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{n}: {got} vs {want}");
            }
        }
    }

    /// The twin agrees with the CPU map's own fused kernel on real-sized random logits: the same
    /// top ids in the same order (no ties in continuous values) and logsumexps to 1e-5.
    #[test]
    fn agrees_with_the_cpu_map_kernel() {
        let (d, vocab, rows) = (24, 3000, 9);
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let wu: Vec<f32> = (0..vocab * d).map(|_| next()).collect();
        let dirs: Vec<f32> = (0..rows * d).map(|_| next() * 4.0).collect();
        let k = 100;
        let cpu = crate::map::kernel::Reducer::with_amx(&wu, d, false).reduce(&dirs, k, &|_| {});
        for (r, want) in cpu.iter().enumerate() {
            let logits: Vec<f32> = wu.chunks_exact(d).map(|u| u.iter().zip(&dirs[r * d..(r + 1) * d]).map(|(a, b)| a * b).sum()).collect();
            let got = reduce_row(&logits, k);
            for (g, w) in [(&got.pos, &want.pos), (&got.neg, &want.neg)] {
                let ids = |p: &PolarityReduction| p.top.iter().map(|t| t.1).collect::<Vec<_>>();
                assert_eq!(ids(g), ids(w), "row {r}");
                assert!((g.lse - w.lse).abs() <= 1e-5 * w.lse.abs().max(1.0), "row {r}: {} vs {}", g.lse, w.lse);
            }
            assert!((got.moments.skew() - want.moments.skew()).abs() < 1e-3, "row {r}");
        }
    }
}
