//! Exact-weight quantized matmuls against the f32 path: every block type, every instruction set
//! this CPU runs, one token and several; and a whole model held exact against the same model in
//! f32.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::model::exact::{ExactLinear, Isa};
use flash_interp::model::{Cache, Intervention, Linear, WeightMode};
use flash_interp::synthetic::{self, TinySpec};

const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn every_block_type_and_instruction_set_matches_the_dequantized_f32_product() {
    let dev = Device::Cpu;
    let (rows, cols) = (37, 512);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev).unwrap();
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).collect();
    assert!(isas.contains(&Isa::Portable));
    for dtype in TYPES {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let reference_w = q.dequantize(&dev).unwrap();
        let exact = Arc::new(ExactLinear::new(&q).unwrap());
        // Holding the blocks changes no weight: dequantized, they are candle's, bit for bit.
        assert_eq!(exact.dequantize().unwrap().to_vec2::<f32>().unwrap(), reference_w.to_vec2::<f32>().unwrap(), "{dtype:?}");
        assert_eq!(exact.rows_f32(&[5, 0, 36]).unwrap().to_vec2::<f32>().unwrap()[2], reference_w.to_vec2::<f32>().unwrap()[36]);
        assert!(exact.rows_f32(&[37]).is_err());
        // One neuron's row or column (block by block) and a product with one vector, as a
        // `Linear`, against the same weight held dense.
        let (held, dense) = (Linear::Exact(exact.clone()), Linear::Candle(QMatMul::Tensor(reference_w.clone())));
        for j in [0, 31, 32, 255, 256, 511] {
            assert_eq!(held.column(j).unwrap().to_vec1::<f32>().unwrap(), dense.column(j).unwrap().to_vec1::<f32>().unwrap(), "{dtype:?} column {j}");
        }
        for i in [0, 17, 36] {
            assert_eq!(held.row(i).unwrap().to_vec1::<f32>().unwrap(), dense.row(i).unwrap().to_vec1::<f32>().unwrap(), "{dtype:?} row {i}");
        }
        assert!(held.column(512).is_err() && held.row(37).is_err());
        assert_eq!(held.rows(&[36, 2]).unwrap().to_vec2::<f32>().unwrap(), dense.rows(&[36, 2]).unwrap().to_vec2::<f32>().unwrap());
        // A few vectors against every row (x · Wᵀ) and every column (x · W), in place.
        for n in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (n, cols), &dev).unwrap();
            let diff = max_abs_diff(&held.forward_f32(&x).unwrap(), &dense.forward_f32(&x).unwrap());
            assert!(diff < 2e-4, "{dtype:?} x·Wᵀ n={n}: {diff}");
            let x = Tensor::randn(0f32, 1.0, (n, rows), &dev).unwrap();
            let (got, want) = (held.forward_t_f32(&x).unwrap(), dense.forward_t_f32(&x).unwrap());
            assert_eq!(got.dims(), &[n, cols]);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "{dtype:?} x·W n={n}: {diff}");
        }
        assert!(held.forward_t_f32(&Tensor::zeros((1, cols), candle_core::DType::F32, &dev).unwrap()).is_err());
        // Enough rows that four threads each take a run of them and their sums are added.
        let tall = Tensor::randn(0f32, 1.0, (300, 64), &dev).unwrap();
        let q = QTensor::quantize(&tall, dtype)
            .unwrap_or_else(|_| QTensor::quantize(&Tensor::randn(0f32, 1.0, (300, 256), &dev).unwrap(), dtype).unwrap());
        let (held, dense) = (Linear::Exact(Arc::new(ExactLinear::new(&q).unwrap())), Linear::Candle(QMatMul::Tensor(q.dequantize(&dev).unwrap())));
        let x = Tensor::randn(0f32, 1.0, (2, 300), &dev).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let got = pool.install(|| held.forward_t_f32(&x).unwrap());
        let diff = max_abs_diff(&got, &dense.forward_t_f32(&x).unwrap());
        assert!(diff < 2e-4, "{dtype:?} x·W over 4 threads: {diff}");
        // One, three and sixteen rows of activations (the kernels: one row, then tiles of up to
        // eight, for the fused block types; Q4_K and Q6_K on AVX-512 take slabs from nine rows, the
        // others from four), twenty-four (dequantized slabs through candle's matmul).
        for (b, t) in [(1, 1), (1, 3), (2, 8), (3, 8)] {
            let fused = exact.slab_rows() == flash_interp::model::exact::SLAB_ROWS;
            assert_eq!(b * t >= exact.slab_rows(), if fused { b * t == 24 } else { b * t >= 16 });
            let x = Tensor::randn(0f32, 1.0, (b, t, cols), &dev).unwrap();
            let want = x.broadcast_matmul(&reference_w.t().unwrap()).unwrap();
            let mut fma: Option<Vec<f32>> = None;
            for &isa in &isas {
                let got = exact.forward_with(&x, isa).unwrap();
                assert_eq!(got.dims(), &[b, t, rows]);
                // Sums of 512 products of size ~1 (results ~20): only the summation order differs.
                let diff = max_abs_diff(&got, &want);
                assert!(diff < 2e-4, "{dtype:?} {} t={t}: {diff}", isa.name());
                // AVX-512 (with its own dequantization of 4-bit blocks) and AVX2 make the same
                // weights and sum them in the same order with fused multiply-adds: the same bits.
                if isa != Isa::Portable {
                    let bits = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    match &fma {
                        Some(first) => assert_eq!(first, &bits, "{dtype:?} t={t}: {} against the other FMA build", isa.name()),
                        None => fma = Some(bits),
                    }
                }
            }
        }
        // In a batch on the kernels (the most rows they take), each row's result is bit for bit
        // what it is alone: a token's numbers do not depend on the batch it is generated in.
        let x = Tensor::randn(0f32, 1.0, (exact.slab_rows() - 1, cols), &dev).unwrap();
        for &isa in &isas {
            let batch = exact.forward_with(&x, isa).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in batch.iter().enumerate() {
                let alone = exact.forward_with(&x.narrow(0, i, 1).unwrap(), isa).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(row, &alone[0], "{dtype:?} {} row {i}", isa.name());
            }
        }
        // A weight whose blocks the kernel does not know is refused, not misread.
        assert!(ExactLinear::new(&QTensor::quantize(&w, GgmlDType::F16).unwrap()).is_err());
    }
}

#[test]
fn a_model_held_exact_gives_the_f32_logits_and_clamp_identities() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    synthetic::write_gguf(&TinySpec { q8: true, ..Default::default() }, &path).unwrap();
    let load = |mode| Engine::load(&path, &LoadOptions { mode, ..Default::default() }).unwrap();
    let (exact, f32) = (load(WeightMode::Exact), load(WeightMode::Dense(candle_core::DType::F32)));
    assert_eq!(load(WeightMode::Auto).weights_desc(), "f32", "auto holds a quantized GGUF exact on the CPU (maps shared with f32)");
    assert!(exact.model.weight_bytes() * 3 < f32.model.weight_bytes(), "{} vs {}", exact.model.weight_bytes(), f32.model.weight_bytes());
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7]], &Device::Cpu).unwrap();
    // The clamp applies to the new token only (the prompt runs unclamped).
    let run = |e: &Engine, iv: &Intervention| {
        let mut cache = Cache::new(e.config());
        let prompt = e.model.forward(&ids, &mut cache, &[Intervention::none()], &[]).unwrap().logits;
        let next = e.model.forward(&Tensor::new(&[[3u32]], &Device::Cpu).unwrap(), &mut cache, std::slice::from_ref(iv), &[1]).unwrap();
        (prompt, next)
    };
    let none = Intervention::none();
    let ((pe, ne), (pf, nf)) = (run(&exact, &none), run(&f32, &none));
    assert!(max_abs_diff(&pe, &pf) < 1e-4 && max_abs_diff(&ne.logits, &nf.logits) < 1e-4);
    // Clamping a neuron to its own value changes nothing.
    let natural = ne.mlp_acts[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap()[3];
    let iv = Intervention { clamps: vec![flash_interp::model::Clamp { layer: 1, neuron: 3, value: natural }] };
    let (_, same) = run(&exact, &iv);
    assert!(max_abs_diff(&same.logits, &ne.logits) < 1e-5);
    let iv = Intervention { clamps: vec![flash_interp::model::Clamp { layer: 1, neuron: 3, value: natural + 50.0 }] };
    assert!(max_abs_diff(&run(&exact, &iv).1.logits, &ne.logits) > 1e-3, "a real clamp moves the logits");
}
