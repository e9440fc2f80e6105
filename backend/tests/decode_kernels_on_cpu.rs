//! The fused decoding kernels themselves (`kernels/decode.cu`), run on the CPU: the kernel source
//! is compiled with the host's C++ compiler against `kernels/emulate/cuda_on_cpu.h` (one OS thread
//! per CUDA thread; barriers for `__syncthreads` and the warp shuffles) with the grids and blocks
//! `model::fused` launches them with, and must give what `model::fused`'s CPU path (candle's ops:
//! the unfused arithmetic) gives, to f32 rounding. So the kernels' indexing (heads, grouped heads,
//! cache slots, both RoPE layouts), the online softmax and its merge across warps, and the block
//! reductions are tested on every machine; the GPU check tests them on a GPU, in bf16 too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use flash_interp::model::fused::{self, Heads};

mod emulate;

/// The kernel and its launcher, compiled once per test run.
fn emulator() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| emulate::compile("decode"))
}

/// The kernel's input, built up field by field.
#[derive(Default)]
struct Input(Vec<u8>);

impl Input {
    fn u32(mut self, v: usize) -> Self {
        self.0.extend((v as u32).to_le_bytes());
        self
    }
    fn u64(mut self, v: usize) -> Self {
        self.0.extend((v as u64).to_le_bytes());
        self
    }
    fn f32(mut self, v: f32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn tensor(mut self, t: &Tensor) -> Self {
        self.0.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()));
        self
    }
    /// The emulated kernel's outputs, split into arrays of `sizes` floats.
    fn run(self, sizes: &[usize]) -> Vec<Vec<f32>> {
        let mut child = Command::new(emulator()).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(&self.0).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "the emulated kernel exited with {}", out.status);
        let all: Vec<f32> = out.stdout.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(all.len(), sizes.iter().sum::<usize>(), "output size");
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                at += n;
                all[at - n..at].to_vec()
            })
            .collect()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| relative to the largest |b| (at least 1).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Seeded values spread like a unit normal's (a sum of uniforms), of `shape`.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (0..12).map(|_| uniform()).sum::<f32>() - 6.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn rope_and_cache_writes_match_the_cpu_path() {
    // Grouped and one-to-one heads, both RoPE layouts, a slot at the start, middle and end; Llama
    // 3.1 8B's heads (32 of 128 over 8), and pairs past one per thread (head dim 256).
    for (case, &(rows, h, kvh, d, cap, at, interleaved)) in
        [(1, 4, 2, 32, 8, 0, false), (3, 4, 1, 64, 5, 4, true), (2, 2, 2, 96, 7, 3, false), (1, 32, 8, 128, 6, 5, false), (1, 2, 1, 256, 3, 1, true)]
            .iter()
            .enumerate()
    {
        let heads = Heads { h, kvh, d, interleaved };
        let qkv = randn(&[rows, 1, (h + 2 * kvh) * d], case as u64);
        // Tables of a few positions past the slot: the kernel reads row `at`.
        let angles = randn(&[at + 3, d / 2], 100 + case as u64);
        let tables = (angles.cos().unwrap(), angles.sin().unwrap());
        let (kc, vc) = (randn(&[rows, kvh, cap, d], 200 + case as u64), randn(&[rows, kvh, cap, d], 300 + case as u64));
        let got = Input::default()
            .u32(0)
            .u32(rows)
            .u32(h)
            .u32(kvh)
            .u32(d)
            .u64(cap)
            .u64(at)
            .u32(interleaved as usize)
            .u32(at + 3)
            .tensor(&qkv)
            .tensor(&tables.0)
            .tensor(&tables.1)
            .tensor(&kc)
            .tensor(&vc)
            .run(&[rows * h * d, kc.elem_count(), vc.elem_count()]);
        // The CPU path writes into the caches it is given: copies of the kernel's inputs.
        let (wk, wv) = (kc.copy().unwrap(), vc.copy().unwrap());
        let dev = Tensor::new(&[at as u32], &Device::Cpu).unwrap();
        let q = fused::rope_append(&qkv, &tables, fused::Slot { at, dev: &dev }, &wk, &wv, heads).unwrap();
        assert_eq!(q.dims(), &[rows, h, 1, d]);
        for (what, g, w) in [("queries", &got[0], values(&q)), ("keys", &got[1], values(&wk)), ("values", &got[2], values(&wv))] {
            let diff = rel_diff(g, &w);
            assert!(diff < 1e-6, "case {case}: {what} differ by {diff}");
        }
        // Only the slot was written: the rest of the caches is what it was.
        assert_eq!(values(&wk.narrow(2, 0, at).unwrap()), values(&kc.narrow(2, 0, at).unwrap()));
    }
}

#[test]
fn attention_matches_the_cpu_path() {
    // One key (the step's own), fewer keys than a warp reads at once, more than a round of every
    // warp's reads (64) and several rounds ending part-way; grouped heads; head dims 32 to 256.
    for (case, &(rows, h, kvh, d, cap, len)) in
        [(1, 4, 2, 32, 4, 1), (2, 4, 4, 64, 9, 3), (1, 8, 2, 128, 80, 77), (2, 2, 1, 256, 40, 40), (1, 2, 1, 64, 300, 291)].iter().enumerate()
    {
        let q = randn(&[rows, h, 1, d], case as u64);
        // Scaled so that the softmax is peaked: the online maximum matters.
        let kc = (randn(&[rows, kvh, cap, d], 10 + case as u64) * 3.0).unwrap();
        let vc = randn(&[rows, kvh, cap, d], 20 + case as u64);
        let scale = 1.0 / (d as f64).sqrt();
        let got = Input::default()
            .u32(1)
            .u32(rows)
            .u32(h)
            .u32(kvh)
            .u32(d)
            .u32(fused::ATTENTION_THREADS as usize)
            .u64(cap)
            .u64(len)
            .f32(scale as f32)
            .tensor(&q)
            .tensor(&kc)
            .tensor(&vc)
            .run(&[rows * h * d]);
        let dev = Tensor::new(&[len as u32 - 1], &Device::Cpu).unwrap();
        let want = fused::attend(&q, &kc, &vc, fused::Slot { at: len - 1, dev: &dev }, scale).unwrap();
        assert_eq!(want.dims(), &[rows, 1, h * d]);
        let diff = rel_diff(&got[0], &values(&want));
        assert!(diff < 1e-5, "case {case}: {diff}");
    }
}

#[test]
fn add_and_norm_match_the_cpu_path() {
    // Rows shorter than a warp, between, and longer than a block (as fused.rs picks threads).
    for (case, &(rows, n)) in [(2usize, 20usize), (1, 576), (2, 2100)].iter().enumerate() {
        let threads = if n >= 1024 { 1024 } else { n.next_multiple_of(32) };
        let (x, y, w) = (randn(&[rows, 1, n], case as u64), randn(&[rows, 1, n], 10 + case as u64), randn(&[n], 20 + case as u64));
        let got = Input::default().u32(2).u32(rows).u32(n).u32(threads).f32(1e-5).tensor(&x).tensor(&y).tensor(&w).run(&[rows * n, rows * n]);
        let (sum, normed) = fused::add_rms_norm(&x, &y, &w, 1e-5).unwrap();
        assert_eq!(got[0], values(&sum), "case {case}: the sums");
        let diff = rel_diff(&got[1], &values(&normed));
        assert!(diff < 1e-5, "case {case}: {diff}");
    }
}

#[test]
fn silu_times_up_matches_the_cpu_path() {
    for (case, &(rows, n)) in [(1, 64), (3, 300)].iter().enumerate() {
        let gu = (randn(&[rows, 1, 2 * n], case as u64) * 4.0).unwrap();
        let got = Input::default().u32(3).u32(rows).u32(n).tensor(&gu).run(&[rows * n]);
        let want = fused::silu_mul(&gu).unwrap();
        assert_eq!(want.dims(), &[rows, 1, n]);
        let diff = rel_diff(&got[0], &values(&want));
        assert!(diff < 1e-6, "case {case}: {diff}");
    }
}
