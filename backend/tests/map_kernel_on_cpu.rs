//! The GPU map's CUDA kernel itself (`kernels/map.cu`), run on the CPU: the kernel source is
//! compiled with the host's C++ compiler against `kernels/emulate/cuda_on_cpu.h` (one OS thread
//! per CUDA thread, barriers for `__syncthreads` and the warp intrinsics) and must give what its
//! plain-Rust twin (`map::select::reduce_row`) gives, and the brute-force answer: the same top
//! tokens in the same order, ties included, the same values bit for bit, logsumexps and moments
//! to rounding, and the rows the twin sends to the radix select must be the rows the kernel
//! counts as sent there. So the kernel's logic (its histogram, both paths of its select,
//! tie-breaking, gathers, sorts and warp reductions) is tested on every machine; only the GPU
//! run can test it on a GPU.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use flash_interp::map::kernel::{Moments, NeuronReduction};
use flash_interp::map::select::{reduce_row_path, CAP, MAX_K};

mod emulate;

/// The kernel and its launcher, compiled once per test run.
fn emulator() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| emulate::compile("map"))
}

/// The kernel's outputs for `rows` rows of `vocab` logits, reshaped like `GpuReducer::collect`'s,
/// and how many rows took the radix select.
fn run_kernel(x: &[f32], vocab: usize, k: usize) -> (Vec<NeuronReduction>, u32) {
    use flash_interp::map::kernel::PolarityReduction;
    let rows = x.len() / vocab;
    let mut input = Vec::with_capacity(20 + 4 * x.len());
    input.extend((rows as u64).to_le_bytes());
    input.extend((vocab as u64).to_le_bytes());
    input.extend((k as i32).to_le_bytes());
    input.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    let mut child = Command::new(emulator()).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the emulated kernel exited with {}", out.status);
    let b = out.stdout;
    assert_eq!(b.len(), rows * (2 * 4 + 4 * 8 + 2 * k * 8) + 4, "output size");
    let f32s = |o: usize, n: usize| -> Vec<f32> { b[o..o + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    let lse = f32s(0, rows * 2);
    let o = rows * 8;
    let mom: Vec<f64> = b[o..o + rows * 32].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
    let o = o + rows * 32;
    let top_val = f32s(o, rows * 2 * k);
    let o = o + rows * 2 * k * 4;
    let top_id: Vec<u32> = b[o..o + rows * 2 * k * 4].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let radix = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap());
    let rows = (0..rows)
        .map(|r| {
            let top = |p: usize| {
                let o = (r * 2 + p) * k;
                top_val[o..o + k].iter().copied().zip(top_id[o..o + k].iter().copied()).collect()
            };
            let m = &mom[r * 4..r * 4 + 4];
            NeuronReduction {
                pos: PolarityReduction { lse: lse[r * 2], top: top(0) },
                neg: PolarityReduction { lse: lse[r * 2 + 1], top: top(1) },
                moments: Moments { n: vocab as f64, mean: m[0], m2: m[1], m3: m[2], m4: m[3] },
            }
        })
        .collect();
    (rows, radix)
}

/// The top k by brute force: everything sorted by value, ties by id.
fn brute_top(x: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut all: Vec<(f32, u32)> = x.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    all.truncate(k);
    all
}

fn brute_lse(x: impl Iterator<Item = f32> + Clone) -> f64 {
    let m = x.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.map(|v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// Within `rel` of `want` relative to max(1, |want|); equal infinities and two NaNs agree (the
/// logsumexp of a row holding +inf is inf - inf, NaN, in every implementation).
fn close(got: f64, want: f64, rel: f64) -> bool {
    got == want || (got.is_nan() && want.is_nan()) || (got - want).abs() <= rel * want.abs().max(1.0)
}

/// Runs the kernel on `rows` rows of `vocab` values from `value(row, i)` and checks every row;
/// `radix`: whether the rows must take the radix select (the twin says so too).
fn check(what: &str, rows: usize, vocab: usize, k: usize, radix: bool, value: impl Fn(usize, usize) -> f32) {
    let x: Vec<f32> = (0..rows * vocab).map(|j| value(j / vocab, j % vocab)).collect();
    let (got, kernel_radix) = run_kernel(&x, vocab, k);
    assert_eq!(kernel_radix as usize, if radix { rows } else { 0 }, "{what}: rows the kernel sent to the radix select");
    for (r, g) in got.iter().enumerate() {
        let row = &x[r * vocab..(r + 1) * vocab];
        let (twin, twin_radix) = reduce_row_path(row, k);
        assert_eq!(twin_radix, radix, "{what}, row {r}: the twin's path");
        let neg: Vec<f32> = row.iter().map(|v| -v).collect();
        let bits = |t: &[(f32, u32)]| t.iter().map(|&(v, i)| (v.to_bits(), i)).collect::<Vec<_>>();
        assert_eq!(bits(&g.pos.top), bits(&brute_top(row, k)), "{what}, row {r}: top k of +x");
        assert_eq!(bits(&g.neg.top), bits(&brute_top(&neg, k)), "{what}, row {r}: top k of -x");
        assert_eq!(bits(&g.pos.top), bits(&twin.pos.top), "{what}, row {r}: the twin's top k of +x");
        assert_eq!(bits(&g.neg.top), bits(&twin.neg.top), "{what}, row {r}: the twin's top k of -x");
        for (got, want, twin, name) in
            [(g.pos.lse, brute_lse(row.iter().copied()), twin.pos.lse, "lse +x"), (g.neg.lse, brute_lse(neg.iter().copied()), twin.neg.lse, "lse -x")]
        {
            assert!(close(got as f64, want, 2e-6), "{what}, row {r}: {name} {got} vs brute force {want}");
            assert!(close(got as f64, twin as f64, 2e-6), "{what}, row {r}: {name} {got} vs the twin's {twin}");
        }
        if row.iter().any(|v| !v.is_finite()) {
            continue; // moments of infinities: nothing to compare (logits are finite)
        }
        let (m, t, e) = (g.moments, twin.moments, Moments::exact(row));
        assert!(close(m.mean, e.mean, 1e-6), "{what}, row {r}: mean {} vs {}", m.mean, e.mean);
        assert!(close(m.mean, t.mean, 1e-9), "{what}, row {r}: mean {} vs the twin's {}", m.mean, t.mean);
        for (name, got, twin, exact) in [
            ("variance", m.variance(), t.variance(), e.variance()),
            ("skew", m.skew(), t.skew(), e.skew()),
            ("kurtosis", m.kurtosis(), t.kurtosis(), e.kurtosis()),
        ] {
            if exact.is_finite() {
                assert!(close(got, exact, 1e-4), "{what}, row {r}: {name} {got} vs {exact}");
                assert!(close(got, twin, 1e-6), "{what}, row {r}: {name} {got} vs the twin's {twin}");
            }
        }
    }
}

/// A seeded uniform in [0, 1) for (seed, row, i).
fn unit(seed: u64, r: usize, i: usize) -> f32 {
    let mut s = seed ^ ((r as u64) << 32) ^ i as u64;
    for _ in 0..3 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    }
    ((s >> 40) as f32) / (1u64 << 24) as f32
}

#[test]
fn logit_like_rows_agree_with_brute_force_and_the_twin() {
    // Vocabulary not a multiple of the block's 256 threads; a few tokens far above the rest.
    check("continuous", 3, 1_001, 100, false, |r, i| (unit(1, r, i) - 0.5) * 8.0 + if i % 97 == 0 { 5.0 } else { 0.0 });
    // Logits far from zero, where the moments must be centred to keep f32 precision.
    check("offset", 2, 777, 7, false, |r, i| 30.0 + (unit(2, r, i) - 0.5) * 0.01);
    // More candidates than the shared sort holds: one histogram bin holds the whole row.
    check("offset, radix", 1, CAP + 500, 100, true, |r, i| 31.0 + (unit(6, r, i) - 0.5) * 0.01);
    // A longer row whose top bins hold a few hundred candidates, ties of equal keys included.
    check("long", 2, 6_000, 100, false, |r, i| ((unit(7, r, i) - 0.5) * 6.0 * 64.0).round() / 64.0);
}

#[test]
fn ties_go_to_the_lower_token_id_across_warps_and_passes() {
    // Four levels only: the k-th place is a tie hundreds wide, spread over every warp and
    // several strides of the block; the largest k the kernel holds.
    check("ties, k = MAX_K", 2, 1_300, MAX_K, false, |r, i| (((unit(3, r, i) * 4.0) as usize) as f32) - 1.5);
    check("ties, k = 1", 2, 600, 1, false, |r, i| if (i + r) % 5 == 0 { 2.0 } else { -1.0 });
    // Every value equal: the top k is the first k ids in both polarities.
    check("all equal", 1, 513, 33, false, |_, _| 0.25);
    // The same through the radix select: a tie wider than the shared sort holds.
    check("ties, radix", 2, 4 * CAP + 100, MAX_K, true, |r, i| (((unit(8, r, i) * 4.0) as usize) as f32) - 1.5);
    check("all equal, radix", 1, CAP + 1, 5, true, |_, _| -0.5);
    // Exactly as many candidates as the shared sort holds: its every slot filled, no radix.
    check("all equal, CAP", 1, CAP, 5, false, |_, _| 0.25);
}

#[test]
fn short_rows_and_infinities() {
    // Fewer tokens than threads, every token in the top k.
    check("vocab < threads, k = vocab", 2, 37, 37, false, |r, i| (unit(4, r, i) - 0.5) * 3.0);
    check("vocab 5", 1, 5, 3, false, |_, i| [1.0, -2.0, 3.0, -0.0, 0.0][i]);
    // -inf logits add nothing to the +x logsumexp and head the -x top k.
    check("with -inf", 1, 300, 4, false, |r, i| if i % 50 == 3 { f32::NEG_INFINITY } else { unit(5, r, i) });
}
