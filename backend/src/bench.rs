//! `flash-interp bench`: the neuron map against numpy and PyTorch peers doing the same
//! computation (matmul + logsumexp + top-100, both polarities) on the same weights, in the same
//! run, reported as ratios; plus search latency with the map loaded.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use flash_interp::analysis;
use flash_interp::map;
use shared::View;

use super::{load, print_json, BenchArgs, Cli};

/// Time `flash-interp map --rebuild` in a child process (so the f32 path can be forced by env).
fn time_map(cli: &Cli, cache: &Path, no_amx: bool) -> Result<f64> {
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(m) = &cli.model {
        cmd.arg("--model").arg(m);
    }
    // The same device and weights as this process (whose map the cache check expects).
    let weights = clap::ValueEnum::to_possible_value(&cli.weights).context("weights name")?;
    cmd.args(["--device", &cli.device, "--weights", weights.get_name()]);
    cmd.args(["--json", "map", "--rebuild"]).env("FLASH_INTERP_CACHE", cache);
    if no_amx {
        cmd.env("FLASH_INTERP_NO_AMX", "1");
    }
    let out = cmd.output()?;
    anyhow::ensure!(out.status.success(), "map failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["seconds"].as_f64().context("map output has no seconds")
}

pub fn run(cli: &Cli, a: &BenchArgs) -> Result<()> {
    if cli.device != "cpu" {
        return run_device(cli, a);
    }
    let engine = load(cli)?;
    let tmp = std::env::temp_dir().join(format!("flash-interp-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> Result<serde_json::Value> {
        eprintln!("exporting weights for the peers...");
        let wu = map::unembedding(&*engine.model, false)?;
        wu.write_npy(tmp.join("wu.npy"))?;
        for l in 0..engine.config().n_layers {
            map::directions(&*engine.model, View::Up, l)?.write_npy(tmp.join(format!("dirs_{l:02}.npy")))?;
        }
        eprintln!("timing our map ({})...", map::kernel::backend_name());
        let ours = time_map(cli, &tmp.join("cache"), false)?;
        eprintln!("timing our map, f32 gemm path...");
        let ours_f32 = time_map(cli, &tmp.join("cache"), true)?;
        let mut peers = serde_json::Map::new();
        for p in &a.peers {
            eprintln!("timing the {p} peer...");
            let mut cmd = Command::new(python());
            cmd.arg(&a.peer).args(["--dir"]).arg(&tmp).args(["--backend", p, "--json", "--chunk", &a.peer_chunk.to_string()]);
            if let Some(v) = run_peer(&mut cmd, p, &a.peer)? {
                peers.insert(p.clone(), v);
            }
        }
        // Search latency with the map in memory (median of 20).
        let (m, _) = engine.map(View::Up, false, &|_, _| {})?;
        let mut ids: Vec<u32> = [" dog", " cat", " Paris"].iter().filter_map(|t| engine.tok.single_token(t).ok()).collect();
        if ids.is_empty() {
            // A vocabulary without them (a synthetic model): what the first neuron is about.
            ids.push(m.top(shared::Polarity::Pos, 0, 0).0[0]);
        }
        let search_ms = search_ms_median(&engine, &m, &ids)?;
        let load_start = Instant::now();
        let path = map::cache_path(&tmp.join("cache"), &engine.info.name, engine.fingerprint()?, View::Up, false);
        map::cache::load(&path, &engine.map_meta(View::Up, false)?)?;
        let cfg = engine.config();
        let cache_load = load_start.elapsed().as_secs_f64();
        Ok(serde_json::json!({
            "neurons": cfg.n_layers * cfg.d_ff,
            "map_seconds": ours,
            "map_backend": map::kernel::backend_name(),
            "map_seconds_f32_path": ours_f32,
            "peers": peers,
            "search_ms_median": search_ms,
            "cache_load_seconds": cache_load,
        }))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let r = result?;
    if cli.json {
        return print_json(&r);
    }
    println!("neuron map of {} ({} neurons):", engine.info.name, r["neurons"]);
    println!("  flash-interp ({})  {:>7.2}s", r["map_backend"].as_str().unwrap_or(""), ours_secs(&r));
    println!("  flash-interp (f32 gemm)     {:>7.2}s", r["map_seconds_f32_path"].as_f64().unwrap_or(f64::NAN));
    for (name, v) in r["peers"].as_object().into_iter().flatten() {
        let s = v["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {name:<26}  {s:>7.2}s   ours is {:.2}x faster ({:.2}x on the f32 path)",
            s / ours_secs(&r),
            s / r["map_seconds_f32_path"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("search (one token, map in memory): median {:.1} ms", r["search_ms_median"].as_f64().unwrap_or(f64::NAN));
    println!("loading the cached map: {:.3}s", r["cache_load_seconds"].as_f64().unwrap_or(f64::NAN));
    Ok(())
}

/// `bench --device cuda`: the map on the device with the model loaded there (timed twice: the
/// first build includes loading the kernels and cuBLAS's set-up), against the PyTorch peer
/// (`scripts/peer_map_gpu.py`) on the same device, weights and dtype; plus search latency.
fn run_device(cli: &Cli, a: &BenchArgs) -> Result<()> {
    let path = super::model_path(cli)?;
    anyhow::ensure!(path.is_dir(), "the device peer reads a Hugging Face directory (e.g. from `flash-interp synth`), not {}", path.display());
    let engine = load(cli)?;
    let build = || -> Result<(map::NeuronMap, f64)> {
        let t = Instant::now();
        let m = map::NeuronMap::build(&*engine.model, View::Up, false, "bench", &engine.weights_desc(), &|_, _| {})?;
        Ok((m, t.elapsed().as_secs_f64()))
    };
    eprintln!("timing our map on {} ({})...", cli.device, engine.weights_desc());
    let (_, first) = build()?;
    #[cfg(feature = "cuda")]
    map::gpu::take_stats();
    let (m, ours) = build()?;
    // Where the timed build's device time went (CUDA events), when it ran on a GPU.
    #[cfg(feature = "cuda")]
    let phases = Some(map::gpu::take_stats()).filter(|s| s.product_seconds > 0.0);
    #[cfg(not(feature = "cuda"))]
    let phases: Option<()> = None;
    let dtype = match engine.weights_desc().as_str() {
        "f32" if std::env::var("FLASH_INTERP_TF32").is_ok_and(|v| v == "1") => "tf32".to_owned(),
        d => d.to_owned(),
    };
    eprintln!("timing the PyTorch peer ({dtype})...");
    let mut cmd = Command::new(python());
    cmd.arg(&a.device_peer).arg("--model").arg(&path).args(["--device", &cli.device, "--dtype", &dtype, "--moments", "--json"]);
    let peer = run_peer(&mut cmd, "PyTorch", &a.device_peer)?;
    let search_ms = search_ms_median(&engine, &m, &[m.top(shared::Polarity::Pos, 0, 0).0[0]])?;
    let peer_secs = peer.as_ref().and_then(|p| p["seconds"].as_f64());
    let r = serde_json::json!({
        "device": cli.device,
        "weights": engine.weights_desc(),
        "neurons": m.n_neurons(),
        "vocab": m.meta.vocab,
        "map_seconds": ours,
        "map_seconds_first": first,
        "map_device_phases": phases,
        "peer": peer,
        "ratio_peer_over_ours": peer_secs.map(|p| p / ours),
        "search_ms_median": search_ms,
    });
    if cli.json {
        return print_json(&r);
    }
    println!("neuron map of {} ({} neurons) on {}:", engine.info.name, m.n_neurons(), cli.device);
    println!("  flash-interp ({})  {ours:>7.3}s (first build {first:.3}s)", engine.weights_desc());
    if let Some(p) = r["map_device_phases"].as_object() {
        let secs = |k: &str| p.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        println!(
            "    on the device: products {:.3}s, reductions {:.3}s ({} rows by radix select)",
            secs("product_seconds"),
            secs("reduce_seconds"),
            p.get("radix_rows").and_then(|v| v.as_u64()).unwrap_or(0)
        );
    }
    if let Some(p) = peer_secs {
        println!("  PyTorch peer ({dtype})  {p:>7.3}s   ours is {:.2}x faster", p / ours);
    }
    println!("search (one token, map in memory): median {search_ms:.1} ms");
    Ok(())
}

/// The Python that runs the peers: `$FLASH_INTERP_PYTHON`, else `python3`.
fn python() -> std::ffi::OsString {
    std::env::var_os("FLASH_INTERP_PYTHON").unwrap_or_else(|| "python3".into())
}

/// Run a peer script and parse the JSON line its output ends with; `None` (its error on stderr)
/// when it fails, so the rest of the benchmark still reports.
fn run_peer(cmd: &mut Command, name: &str, script: &Path) -> Result<Option<serde_json::Value>> {
    let out = cmd.output().with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        eprintln!("  {name} peer skipped: {}", String::from_utf8_lossy(&out.stderr).trim());
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or(""))?))
}

/// Search latency with the map in memory: the median of 20 searches (after one untimed), one
/// token of `ids` at a time in turn.
fn search_ms_median(engine: &flash_interp::Engine, m: &map::NeuronMap, ids: &[u32]) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..21 {
        let t = Instant::now();
        analysis::search(engine, m, &ids[i % ids.len()..=i % ids.len()], 20)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(median(times).unwrap_or(f64::NAN))
}

fn ours_secs(r: &serde_json::Value) -> f64 {
    r["map_seconds"].as_f64().unwrap_or(f64::NAN)
}

/// One side's timing of a greedy generation.
#[derive(serde::Serialize)]
struct GenTiming {
    prefill_seconds: f64,
    decode_tokens_per_second: f64,
    tokens_per_second: f64,
}

/// Our greedy generation of `n` tokens after `ids`: prefill time (to the first token), decode
/// tokens/s (the tokens after the first over the time after it), overall tokens/s, and the tokens.
fn time_ours(engine: &flash_interp::Engine, ids: &[u32], n: usize) -> Result<(GenTiming, Vec<u32>)> {
    let params = shared::SamplingParams { max_new_tokens: n, ..Default::default() };
    let start = Instant::now();
    let mut first = None;
    let out =
        engine.generate(ids, &[flash_interp::model::Intervention::none()], &params, true, &flash_interp::Cancel::default(), &mut |_, _, _| {
            first.get_or_insert_with(Instant::now);
            true
        })?;
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let toks = out.into_iter().next().map(|o| o.tokens).unwrap_or_default();
    let timing = GenTiming {
        prefill_seconds: (first - start).as_secs_f64(),
        decode_tokens_per_second: toks.len().saturating_sub(1) as f64 / (end - first).as_secs_f64().max(1e-9),
        tokens_per_second: toks.len() as f64 / (end - start).as_secs_f64().max(1e-9),
    };
    Ok((timing, toks))
}

/// Where one greedy decoding step's time goes: `queue_ms`, the host running the forward pass's
/// code up to its logits (on a GPU, queueing its kernels, waiting only where an op
/// synchronises); `drain_ms`, the device finishing after that; `read_ms`, the argmax coming back
/// to the host. A host-bound step (queue ≈ step, drain ≈ 0: launch overhead) wants fewer, fused
/// launches or CUDA graphs; a device-bound one, faster kernels. Medians over `steps` steps after
/// the prompt, each started on an idle device.
fn step_profile(engine: &flash_interp::Engine, ids: &[u32], steps: usize) -> Result<serde_json::Value> {
    use candle_core::{Tensor, D};
    use flash_interp::model::{Cache, Intervention, Room};
    let (dev, none) = (engine.model.device(), [Intervention::none()]);
    let mut cache = Cache::new(engine.config()).with_room(Room::Positions(ids.len() + steps + 1));
    let argmax = |logits: &Tensor| -> Result<u32> { Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0]) };
    let mut next = argmax(&engine.model.forward(&Tensor::new(ids, dev)?.unsqueeze(0)?, &mut cache, &none, &[])?.logits)?;
    let (mut queue, mut drain, mut read) = (vec![], vec![], vec![]);
    for _ in 0..steps {
        dev.synchronize()?;
        let t0 = Instant::now();
        let out = engine.model.forward(&Tensor::new(&[[next]], dev)?, &mut cache, &none, &[])?;
        let t1 = Instant::now();
        dev.synchronize()?;
        let t2 = Instant::now();
        next = argmax(&out.logits)?;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        queue.push(ms(t0, t1));
        drain.push(ms(t1, t2));
        read.push(ms(t2, Instant::now()));
    }
    let (queue, drain, read) = (median(queue), median(drain), median(read));
    Ok(serde_json::json!({ "steps": steps, "queue_ms": queue, "drain_ms": drain, "read_ms": read,
        "step_ms": queue.zip(drain).zip(read).map(|((q, d), r)| q + d + r) }))
}

/// Tokens/s of `streams` steer streams in one batch: each a normal and a steered row (the last
/// layer's first neuron clamped to 5), `n` sampled tokens per row (temperature 0.7, seed per
/// stream; a row that samples the end of text stops there).
fn time_streams(engine: &flash_interp::Engine, ids: &[u32], n: usize, streams: usize) -> Result<f64> {
    let (variants, seeds): (Vec<_>, Vec<_>) = (0..streams as u64).flat_map(|s| steer_stream(engine, s, n).0.into_iter().zip([s, s])).unzip();
    let params = steer_stream(engine, 0, n).1;
    let start = Instant::now();
    let out = engine.generate_rows(ids, &variants, &seeds, &params, true, &flash_interp::Cancel::default(), &mut |_, _, _| true)?;
    let tokens: usize = out.iter().map(|o| o.tokens.len()).sum();
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Steer stream `s` of the benchmarks: a normal and a steered row (the last layer's first neuron
/// clamped to 5), and its sampling (temperature 0.7, seed `s`, `n` tokens).
fn steer_stream(engine: &flash_interp::Engine, s: u64, n: usize) -> ([flash_interp::model::Intervention; 2], shared::SamplingParams) {
    use flash_interp::model::{Clamp, Intervention};
    let steer = Intervention { clamps: vec![Clamp { layer: engine.config().n_layers - 1, neuron: 0, value: 5.0 }] };
    ([Intervention::none(), steer], shared::SamplingParams { temperature: 0.7, top_p: None, seed: s, max_new_tokens: n })
}

/// Tokens/s of `requests` steer requests at once through a [`Batcher`] (the server's path:
/// separate requests, each a normal and a steered row as [`time_streams`] makes them, its own
/// cache and seed, sharing each decoding step).
///
/// [`Batcher`]: flash_interp::batch::Batcher
fn time_requests(engine: &Arc<flash_interp::Engine>, ids: &[u32], n: usize, requests: usize) -> Result<f64> {
    use flash_interp::batch::{Batcher, Job};
    let batch = Batcher::new(engine.clone());
    let start = Instant::now();
    let outcomes: Vec<_> = (0..requests as u64)
        .map(|r| {
            let (variants, params) = steer_stream(engine, r, n);
            let (job, outcome) = Job::plain(ids.to_vec(), variants.to_vec(), vec![r, r], params);
            batch.submit(job);
            outcome
        })
        .collect();
    let mut tokens = 0;
    for o in outcomes {
        tokens += o.wait()?.iter().map(|o| o.tokens.len()).sum::<usize>();
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run_generate(cli: &Cli, a: &super::BenchGenerateArgs) -> Result<()> {
    let path = super::model_path(cli)?;
    let engine = Arc::new(load(cli)?);
    let spec = shared::PromptSpec { text: a.prompt.clone(), chat: None, messages: None };
    let ids = engine.prompt_ids(&spec)?;
    let threads = rayon::current_num_threads();
    eprintln!("timing ours ({} weights, {threads} threads)...", engine.weight_mode().name());
    time_ours(&engine, &ids, 8)?; // warm-up

    // On a GGUF, our runs and llama.cpp's alternate (one of each per round, the peer a fresh
    // process each time), so that this machine's drift in speed between minutes falls on both
    // sides alike; the ratios are the medians of the rounds' own ratios.
    let gguf = path.extension().is_some_and(|e| e == "gguf");
    let (mut ours, mut rounds) = (Vec::new(), Vec::new());
    let mut peer_ok = gguf && !a.no_peer;
    for round in 0..a.runs.max(1) {
        ours.push(time_ours(&engine, &ids, a.tokens)?);
        if peer_ok {
            eprintln!("timing llama.cpp (round {} of {})...", round + 1, a.runs.max(1));
            let mut cmd = Command::new(&a.python);
            cmd.arg(&a.peer)
                .arg("--model")
                .arg(&path)
                .args(["--tokens-json", &serde_json::to_string(&ids)?, "--new", &a.tokens.to_string(), "--runs", "1"])
                .args(["--threads", &threads.to_string()]);
            match run_peer(&mut cmd, "llama.cpp", &a.peer)? {
                Some(p) => rounds.push(p),
                None => peer_ok = false,
            }
        }
    }
    let paired = |k: &str| median(ours.iter().zip(&rounds).filter_map(|((o, _), p)| Some(ours_of(o, k) / p[k].as_f64()?)).collect());
    let paired_ratios = (paired("decode_tokens_per_second"), paired("tokens_per_second"));
    ours.sort_by(|x, y| x.0.decode_tokens_per_second.total_cmp(&y.0.decode_tokens_per_second));
    let (ours, our_tokens) = ours.swap_remove(ours.len() / 2);
    let our_rss = peak_rss();
    let peer = if a.no_peer {
        None
    } else if gguf {
        median_peer(rounds)
    } else {
        // A Hugging Face directory: transformers' generate on the same device, dtype and tokens.
        eprintln!("timing HF transformers...");
        let dtype = engine.weight_mode().compute_dtype();
        let mut cmd = Command::new(&a.python);
        cmd.arg(&a.hf_peer)
            .arg("--model")
            .arg(&path)
            .args(["--device", &cli.device, "--dtype", &format!("{dtype:?}").to_lowercase(), "--json"])
            .args(["--prompt-ids", &ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","), "--max-new-tokens", &a.tokens.to_string()])
            .args(["--runs", &a.runs.max(1).to_string()]); // as many timed runs as ours
        run_peer(&mut cmd, "transformers", &a.hf_peer)?
    };
    // A 16-value clamp sweep of the last layer's first neuron, for our first greedy token.
    let sweep_seconds = match our_tokens.first() {
        Some(&target) => {
            let layer = engine.config().n_layers - 1;
            let values = shared::linspace(-8.0, 8.0, 16);
            engine.sweep(&ids, layer, 0, target, &values[..2], &flash_interp::Cancel::default())?;
            let t = Instant::now();
            engine.sweep(&ids, layer, 0, target, &values, &flash_interp::Cancel::default())?;
            Some(t.elapsed().as_secs_f64())
        }
        None => None,
    };
    // Where a decoding step's time goes (a failure here leaves the rest of the report).
    let profile = step_profile(&engine, &ids, 32).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
    // Concurrent steer streams in one batch against one stream.
    // In rounds too (one stream, the streams in one batch, the same as separate requests), the
    // ratios being the medians of the rounds' own.
    let streams = if a.streams > 0 {
        let (mut one, mut many, mut apart) = (vec![], vec![], vec![]);
        for round in 0..a.runs.max(1) {
            eprintln!("timing 1 and {} steer streams (round {} of {})...", a.streams, round + 1, a.runs.max(1));
            one.push(time_streams(&engine, &ids, a.tokens, 1)?);
            many.push(time_streams(&engine, &ids, a.tokens, a.streams)?);
            // The same streams as separate requests sharing the server's batch.
            apart.push(time_requests(&engine, &ids, a.tokens, a.streams)?);
        }
        let ratios = |xs: &[f64]| median(xs.iter().zip(&one).map(|(x, o)| x / o).collect());
        Some(serde_json::json!({
            "streams": a.streams, "rounds": one.len(), "ratio": ratios(&many), "requests_ratio": ratios(&apart),
            "one_tokens_per_second": median(one.clone()), "batch_tokens_per_second": median(many),
            "requests_tokens_per_second": median(apart),
        }))
    } else {
        None
    };
    let ratio = |k: &str| match (k, paired_ratios) {
        ("decode_tokens_per_second", (Some(r), _)) | ("tokens_per_second", (_, Some(r))) => Some(r),
        _ => peer.as_ref().and_then(|p| p[k].as_f64()).map(|theirs| ours_of(&ours, k) / theirs),
    };
    let same = peer.as_ref().and_then(|p| serde_json::from_value::<Vec<u32>>(p["tokens"].clone()).ok()).map(|t| common_prefix(&t, &our_tokens));
    let r = serde_json::json!({
        "model": engine.info.name,
        "prompt_tokens": ids.len(),
        "new_tokens": a.tokens,
        "threads": threads,
        "fused_decode_blocks": engine.model.fused_blocks(),
        "graph_replays": flash_interp::model::graph::replays(),
        "ours": { "weights": engine.weight_mode().name(), "timing": ours, "peak_rss_bytes": our_rss, "tokens": our_tokens.len() },
        "peer": peer.as_ref().map(|p| { let mut p = p.clone(); p.as_object_mut().map(|o| o.remove("tokens")); p }),
        "ratio_decode": ratio("decode_tokens_per_second"),
        "ratio_overall": ratio("tokens_per_second"),
        "ratio_peak_rss": peer.as_ref().and_then(|p| p["peak_rss_bytes"].as_f64()).zip(our_rss).map(|(t, o)| o as f64 / t),
        "greedy_tokens_in_common": same,
        "sweep_16_values_seconds": sweep_seconds,
        "decode_step": profile,
        "steer_streams": streams,
    });
    if cli.json {
        return print_json(&r);
    }
    let mb = |b: Option<f64>| b.map_or("?".into(), |b| format!("{:.0} MB", b / 1e6));
    let peer_name = if path.is_dir() { "transformers" } else { "llama.cpp" };
    if let Some(s) = sweep_seconds {
        println!("a 16-value clamp sweep: {s:.3}s");
    }
    if let (Some(q), Some(d), Some(r)) = (profile["queue_ms"].as_f64(), profile["drain_ms"].as_f64(), profile["read_ms"].as_f64()) {
        println!("one decoding step (median): {q:.2} ms running the forward pass, {d:.2} ms more on the device, {r:.2} ms reading the token");
    }
    if let Some(s) = &streams {
        println!(
            "steer streams (normal + steered rows, sampled; medians of {} rounds): 1 stream {:.1} tok/s, {} in one batch {:.1} tok/s ({:.2}x)",
            s["rounds"],
            s["one_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            a.streams,
            s["batch_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            s["ratio"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  as {} separate requests sharing the server's batch: {:.1} tok/s ({:.2}x)",
            a.streams,
            s["requests_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            s["requests_ratio"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "greedy generation of {} tokens after {} prompt tokens on {}, {threads} threads, {}:",
        a.tokens,
        ids.len(),
        cli.device,
        engine.info.name
    );
    println!(
        "  flash-interp ({:<9})  decode {:>6.1} tok/s   prefill {:>6.3}s   peak RSS {}",
        engine.weight_mode().name(),
        ours.decode_tokens_per_second,
        ours.prefill_seconds,
        mb(our_rss.map(|b| b as f64))
    );
    if let Some(p) = &peer {
        println!(
            "  {:<23} decode {:>6.1} tok/s   prefill {:>6.3}s   peak RSS {}",
            peer_name,
            p["decode_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            p["prefill_seconds"].as_f64().unwrap_or(f64::NAN),
            mb(p["peak_rss_bytes"].as_f64())
        );
        println!(
            "  ours / {peer_name}: decode {:.2}x, overall {:.2}x, peak RSS {:.2}x; the first {} greedy tokens agree{}",
            r["ratio_decode"].as_f64().unwrap_or(f64::NAN),
            r["ratio_overall"].as_f64().unwrap_or(f64::NAN),
            r["ratio_peak_rss"].as_f64().unwrap_or(f64::NAN),
            same.unwrap_or(0),
            p["rounds"].as_u64().map_or(String::new(), |n| format!(" (ratios: the median of {n} interleaved rounds)"))
        );
    }
    Ok(())
}

/// The peer's rounds as one result: its median run by decode tokens/s (the tokens it chose), with
/// the median prefill time and overall tokens/s, and the largest peak memory of its processes.
fn median_peer(mut rounds: Vec<serde_json::Value>) -> Option<serde_json::Value> {
    let of = |k: &str| median(rounds.iter().filter_map(|p| p[k].as_f64()).collect());
    let (prefill, overall) = (of("prefill_seconds"), of("tokens_per_second"));
    let rss = rounds.iter().filter_map(|p| p["peak_rss_bytes"].as_f64()).fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))));
    let n = rounds.len();
    rounds.sort_by(|x, y| x["decode_tokens_per_second"].as_f64().unwrap_or(0.0).total_cmp(&y["decode_tokens_per_second"].as_f64().unwrap_or(0.0)));
    let mut p = rounds.into_iter().nth(n / 2)?;
    p["prefill_seconds"] = prefill.into();
    p["tokens_per_second"] = overall.into();
    p["peak_rss_bytes"] = rss.into();
    p["rounds"] = n.into();
    Some(p)
}

/// The middle value (the upper one of an even count); `None` for none.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn ours_of(t: &GenTiming, key: &str) -> f64 {
    match key {
        "decode_tokens_per_second" => t.decode_tokens_per_second,
        _ => t.tokens_per_second,
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
