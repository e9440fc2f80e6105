//! Decoding steps replayed from a CUDA graph (opt-in: `FLASH_INTERP_CUDA_GRAPH=1`, which also
//! turns the fused step on). A fused decoding step is still some 300 launches for an 8B model,
//! each costing the host microseconds; captured once, the step's launches replay as one. What
//! changes between steps lives in device memory the graph reads: the input token ids (one
//! buffer, written before each replay), the position (`Cache::step_slot`), and the caches
//! (allocated for the whole generation, `Room::Positions`). The host keeps its record of the
//! cache in step ([`Cache::stepped`]).
//!
//! One generation's rows, on the device's one stream: for `generate` (the CLI, `bench-generate`),
//! not for the server's shared batch, whose groups change from step to step. While a step is
//! captured nothing else may use that stream (another thread's work would be recorded into the
//! graph): one generation at a time on the device, as the CLI runs. The first decoding
//! step runs plainly while candle records the small uploads (shapes, strides) that the capture
//! must find cached; the second is captured and launched; every later one is a replay. Where
//! capture is not possible (clamps, whose masks are uploaded per step; a block off the fused path;
//! any error while capturing) the generation carries on plainly, with the same tokens.

use candle_core::Tensor;

use super::common::{Cache, Intervention};
use super::LanguageModel;
use crate::error::Result;

static REPLAYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Decoding steps replayed from captured graphs so far, in this process (what `bench-generate`
/// and `device-check` report, so that a run says whether its steps were replays).
pub fn replays() -> u64 {
    REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether decoding steps on `device` replay a captured graph (`FLASH_INTERP_CUDA_GRAPH=1`, on a
/// CUDA device whose driver allocates in stream order: a capture records allocations only so).
pub(crate) fn wanted(device: &candle_core::Device) -> bool {
    device.is_cuda() && std::env::var("FLASH_INTERP_CUDA_GRAPH").is_ok_and(|v| v == "1") && stream_ordered_alloc(device)
}

#[cfg(feature = "cuda")]
fn stream_ordered_alloc(device: &candle_core::Device) -> bool {
    device.as_cuda_device().is_ok_and(|d| d.cuda_stream().context().has_async_alloc())
}

#[cfg(not(feature = "cuda"))]
fn stream_ordered_alloc(_: &candle_core::Device) -> bool {
    false
}

/// One generation's decoding steps: plain forward passes, or a captured step's replays.
pub struct DecodeGraph {
    state: State,
}

enum State {
    /// Plain forward passes.
    Off,
    /// The next step runs plainly, recording candle's uploads for the capture after it.
    Warm,
    /// The next step is captured into a graph; `ids` is the input buffer the warm step used.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Capture { ids: Tensor },
    /// Every step replays `graph`, reading `ids`, writing `logits`.
    #[cfg(feature = "cuda")]
    Ready { graph: candle_core::cuda_backend::cudarc::driver::CudaGraph, ids: Tensor, logits: Tensor },
}

impl DecodeGraph {
    /// For a generation of `variants` on `model`: replays where [`wanted`], every block takes
    /// the fused step, and no row clamps a neuron; else plain steps.
    pub fn new(model: &dyn LanguageModel, variants: &[Intervention]) -> Self {
        let on = wanted(model.device()) && model.fused_blocks() == model.config().n_layers && variants.iter().all(Intervention::is_empty);
        Self { state: if on { State::Warm } else { State::Off } }
    }

    /// One decoding step: tokens `next` (one per row) into `cache`, returning the logits
    /// `[rows, vocab]` (f32): what [`LanguageModel::forward_rows`] gives. Not checked for
    /// finiteness here: the sampler checks every running row's on the host, where a check on the
    /// device cost a reduction and a wait at every step (0.3 ms a token on Gemma's vocabulary).
    pub fn step(&mut self, model: &dyn LanguageModel, next: Vec<u32>, cache: &mut Cache, variants: &[Intervention]) -> Result<Tensor> {
        let n = next.len();
        let input = Tensor::from_vec(next, (n, 1), model.device())?;
        match std::mem::replace(&mut self.state, State::Off) {
            State::Off => Ok(model.forward_rows(&input, cache, variants, &[])?.logits),
            State::Warm => {
                // The position first, outside what candle records (it would keep one upload per
                // position it saw).
                cache.step_slot(model.device())?;
                #[cfg(feature = "cuda")]
                let _record = model.device().as_cuda_device()?.enable_cuda_graph_htod_cache();
                let out = model.forward(&input, cache, variants, &[])?;
                self.state = State::Capture { ids: input };
                Ok(out.logits)
            }
            #[cfg(not(feature = "cuda"))]
            State::Capture { .. } => Ok(model.forward_rows(&input, cache, variants, &[])?.logits),
            #[cfg(feature = "cuda")]
            State::Capture { ids } => {
                if !room_for_one_more(cache, model.config().max_seq_len) {
                    return Ok(model.forward_rows(&input, cache, variants, &[])?.logits);
                }
                ids.slice_set(&input, 0, 0)?;
                match gpu::capture(model, &ids, cache, variants)? {
                    Some((graph, logits)) => {
                        self.state = State::Ready { graph, ids, logits: logits.clone() };
                        Ok(logits)
                    }
                    None => Ok(model.forward_rows(&input, cache, variants, &[])?.logits),
                }
            }
            #[cfg(feature = "cuda")]
            State::Ready { graph, ids, logits } => {
                if !room_for_one_more(cache, model.config().max_seq_len) {
                    return Ok(model.forward_rows(&input, cache, variants, &[])?.logits);
                }
                ids.slice_set(&input, 0, 0)?;
                cache.step_slot(model.device())?;
                graph.launch().map_err(|e| crate::error::Error::Candle(candle_core::Error::Msg(format!("replaying a decoding step: {e}"))))?;
                cache.stepped();
                REPLAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.state = State::Ready { graph, ids, logits: logits.clone() };
                Ok(logits)
            }
        }
    }
}

/// Whether every layer's cache has room for one more position without growing (a replay writes
/// into the buffers it was captured with), within the model's context of `max_seq_len` (a
/// replay runs none of the forward pass's host checks; its kernels index the RoPE tables).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn room_for_one_more(cache: &Cache, max_seq_len: usize) -> bool {
    cache.seq_len < max_seq_len && cache.kvs.iter().all(|kv| kv.as_ref().is_some_and(|c| c.k.dims().get(2).is_some_and(|&cap| c.len < cap)))
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
    use candle_core::cuda_backend::cudarc::driver::{result, CudaGraph, CudaStream};
    use candle_core::Tensor;

    use super::super::common::{Cache, Intervention};
    use super::super::LanguageModel;
    use crate::error::Result;

    /// Capture one step of `ids` into `cache` and launch it. `None` (the cache as it was, and a
    /// warning in the log) when the step cannot be captured.
    pub(super) fn capture(
        model: &dyn LanguageModel,
        ids: &Tensor,
        cache: &mut Cache,
        variants: &[Intervention],
    ) -> Result<Option<(CudaGraph, Tensor)>> {
        let dev = model.device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        // Written before the capture: inside it, the step finds the slot already holding its
        // position and writes nothing.
        cache.step_slot(model.device())?;
        let (seq_len, lens): (usize, Vec<Option<usize>>) = (cache.seq_len, cache.kvs.iter().map(|kv| kv.as_ref().map(|c| c.len)).collect());
        let _cached = dev.enable_cuda_graph_htod_cache();
        stream.synchronize().map_err(|e| fail(format!("before capturing: {e}")))?;
        // An error recorded before (a failed free) is the device's to report, not the capture's.
        stream.context().check_err().map_err(|e| fail(format!("before capturing: {e}")))?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| fail(format!("starting a capture: {e}")))?;
        let open = Open(&stream);
        // `run`, not `forward`: the finite check copies to the host, which a capture cannot.
        let out = model.run(ids, cache, variants, &[]);
        // Frees that failed in an invalidated capture leave an error recorded, which cudarc's
        // `end_capture` would return before ending the capture: taken first, as the capture's.
        let recorded = stream.context().check_err();
        let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        drop(open);
        let why = match (out, recorded, graph) {
            (Ok(out), Err(e), _) => {
                std::mem::forget(out);
                format!("during the capture: {e}")
            }
            (Ok(out), Ok(()), Ok(Some(graph))) => match graph.launch() {
                Ok(()) => {
                    tracing::info!("decoding steps replay a captured CUDA graph");
                    return Ok(Some((graph, out.logits)));
                }
                Err(e) => {
                    // Its output lives in the graph's memory: not freed by hand.
                    std::mem::forget(out);
                    format!("launching it: {e}")
                }
            },
            (Ok(out), Ok(()), Ok(None)) => {
                std::mem::forget(out);
                "the capture recorded nothing".to_string()
            }
            (Ok(out), Ok(()), Err(e)) => {
                std::mem::forget(out);
                format!("ending the capture: {e}")
            }
            (Err(e), _, _) => format!("the step: {e}"),
        };
        tracing::warn!("decoding steps run plainly: a CUDA graph of the step could not be captured ({why})");
        // The plain steps after this need the stream out of capture mode.
        let status = stream.capture_status().map_err(|e| fail(format!("after a failed capture: {e}")))?;
        if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Err(fail(format!("the stream is still capturing ({status:?}) after a failed capture ({why})")));
        }
        cache.seq_len = seq_len;
        for (kv, len) in cache.kvs.iter_mut().zip(lens) {
            match (kv.as_mut(), len) {
                (Some(c), Some(len)) => c.len = len,
                (Some(_), None) => *kv = None,
                _ => {}
            }
        }
        Ok(None)
    }

    /// A capture in progress on a stream, ended when dropped if it still is (a step that panicked
    /// while captured): the stream is the device's only one, and a stream left capturing would
    /// fail everything after.
    struct Open<'a>(&'a CudaStream);

    impl Drop for Open<'_> {
        fn drop(&mut self) {
            if self.0.capture_status().is_ok_and(|s| s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) {
                let _ = self.0.context().check_err();
                // SAFETY: the stream is live; the graph an ended capture returns is ours, never
                // instantiated, and destroyed here once.
                if let Ok(g) = unsafe { result::stream::end_capture(self.0.cu_stream()) } {
                    if !g.is_null() {
                        let _ = unsafe { result::graph::destroy(g) };
                    }
                }
            }
        }
    }

    fn fail(what: String) -> crate::error::Error {
        crate::error::Error::Candle(candle_core::Error::Msg(format!("CUDA graph: {what}")))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::engine::{Engine, LoadOptions};
    use crate::model::{Llama, Room};
    use crate::synthetic::{self, TinySpec};

    /// A replay leaves the host's record of the cache as the step it replays leaves it
    /// ([`Cache::stepped`] against a fused step run plainly), and the check before a replay stops
    /// at a full cache (a replay writes into the buffers it was captured with).
    #[test]
    fn a_replays_bookkeeping_is_the_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        synthetic::write_gguf(&TinySpec { d_model: 128, n_heads: 4, n_kv_heads: 2, ..Default::default() }, &path).unwrap();
        let o = Engine::open(&path, &LoadOptions::default()).unwrap();
        let m = Llama::load_with(&*o.src, &o.cfg, true).unwrap();
        let dev = Device::Cpu;
        let prompt = Tensor::new(&[1u32, 40, 77], &dev).unwrap().unsqueeze(0).unwrap();
        let cache = || Cache::new(&o.cfg).with_room(Room::Positions(5));
        let (mut ran, mut replayed) = (cache(), cache());
        for c in [&mut ran, &mut replayed] {
            m.forward(&prompt, c, &[], &[]).unwrap();
        }
        let record = |c: &Cache| (c.seq_len, c.kvs.iter().map(|kv| kv.as_ref().map(|k| (k.len, k.k.dims().to_vec()))).collect::<Vec<_>>());
        assert!(!room_for_one_more(&ran, 3), "the model's context is full at 3 positions, the cache's is not");
        for s in 0..2u32 {
            assert!(room_for_one_more(&ran, o.cfg.max_seq_len), "step {s}");
            m.forward(&Tensor::new(&[[5 + s]], &dev).unwrap(), &mut ran, &[], &[]).unwrap();
            replayed.stepped();
            assert_eq!(record(&ran), record(&replayed), "step {s}");
        }
        assert!(!room_for_one_more(&ran, o.cfg.max_seq_len), "5 positions held");
        // Off the GPU, a generation's steps are plain forward passes.
        assert!(matches!(DecodeGraph::new(&m, &[Intervention::none()]).state, State::Off));
    }
}
