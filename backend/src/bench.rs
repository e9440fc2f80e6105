//! `flash-interp bench`: the neuron map against numpy and PyTorch peers doing the same
//! computation (matmul + logsumexp + top-100, both polarities) on the same weights, in the same
//! run, reported as ratios; plus search latency with the map loaded.

use std::path::Path;
use std::process::Command;
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
            let out = Command::new("python3")
                .arg(&a.peer)
                .args(["--dir"])
                .arg(&tmp)
                .args(["--backend", p, "--json", "--chunk", &a.peer_chunk.to_string()])
                .output()
                .with_context(|| format!("running {}", a.peer.display()))?;
            if !out.status.success() {
                eprintln!("  {p} peer skipped: {}", String::from_utf8_lossy(&out.stderr).trim());
                continue;
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))?;
            peers.insert(p.clone(), v);
        }
        // Search latency with the map in memory (median of 20).
        let (m, _) = engine.map(View::Up, false, &|_, _| {})?;
        let ids: Vec<u32> = [" dog", " cat", " Paris"].iter().filter_map(|t| engine.tok.single_token(t).ok()).collect();
        let mut times = Vec::new();
        for i in 0..21 {
            let t = Instant::now();
            analysis::search(&engine, &m, &ids[i % ids.len()..=i % ids.len()], 20)?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        times.sort_by(f64::total_cmp);
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
            "search_ms_median": times[times.len() / 2],
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

fn ours_secs(r: &serde_json::Value) -> f64 {
    r["map_seconds"].as_f64().unwrap_or(f64::NAN)
}
