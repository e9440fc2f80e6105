//! Typed messages shared by the backend (CLI `--json` output and HTTP API) and the web frontend.
//! Serde only: this crate knows nothing of actix, leptos or candle.

use serde::{Deserialize, Serialize};

/// Documented bounds on inputs; the backend rejects anything outside them with a clear error.
pub mod limits {
    /// Largest absolute clamp value accepted. Natural activations of the default model stay
    /// within a few tens; this leaves room for strong steering while refusing absurd values.
    pub const MAX_CLAMP_ABS: f32 = 1000.0;
    /// Most clamps in one request.
    pub const MAX_CLAMPS: usize = 16;
    /// Most values in one clamp sweep.
    pub const MAX_SWEEP_VALUES: usize = 64;
    /// Most new tokens in one generation.
    pub const MAX_NEW_TOKENS: usize = 512;
    /// Longest prompt, in bytes of text and in tokens.
    pub const MAX_PROMPT_BYTES: usize = 16 * 1024;
    pub const MAX_PROMPT_TOKENS: usize = 2048;
    pub const MAX_TEMPERATURE: f64 = 5.0;
    /// Most top-k entries returned by a next-token query.
    pub const MAX_TOP_K: usize = 100;
    /// Causal verification: most candidate neurons, clamp values per neuron, and prompts.
    pub const MAX_VERIFY_CANDIDATES: usize = 32;
    pub const MAX_VERIFY_VALUES: usize = 17;
    pub const MAX_VERIFY_PROMPTS: usize = 4;
    /// Most tokens in a phrase concept.
    pub const MAX_PHRASE_TOKENS: usize = 8;
    /// Most samples in one generate request (each one or two batch rows).
    pub const MAX_SAMPLES: usize = 8;
    /// Points per layer a search sends for its plot unless asked otherwise (see
    /// `LayerScores::decimate`): 512 × 32 layers keeps Llama 3.1 8B's answer near 200 KB of JSON
    /// where every neuron would be 3 MB, and is still several points per pixel of a wide screen.
    pub const SEARCH_POINTS: usize = 512;
}

/// `n` evenly spaced values from `from` to `to`, both ends exact: computed in f64, so rounding
/// never steps past an end (a sweep ending at the ±1000 limit stays within it).
pub fn linspace(from: f32, to: f32, n: usize) -> Vec<f32> {
    if !(from.is_finite() && to.is_finite()) {
        return vec![f32::NAN; n]; // refused by whoever checks the values (clamp values must be finite)
    }
    let (lo, hi) = (from.min(to), from.max(to));
    (0..n)
        .map(|i| if i + 1 == n { to } else { (from as f64 + (to as f64 - from as f64) * i as f64 / (n - 1).max(1) as f64) as f32 })
        .map(|v| v.clamp(lo, hi))
        .collect()
}

/// Which weight vector of an MLP neuron is decoded through the LM head.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// The up_proj row: what the neuron reads (the paper's method).
    Up,
    /// The gate_proj row.
    Gate,
    /// The down_proj column: what the neuron writes.
    Down,
}

impl View {
    pub const ALL: [View; 3] = [View::Up, View::Gate, View::Down];
    pub fn as_str(&self) -> &'static str {
        match self {
            View::Up => "up",
            View::Gate => "gate",
            View::Down => "down",
        }
    }
}

impl std::str::FromStr for View {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "up" => Ok(View::Up),
            "gate" => Ok(View::Gate),
            "down" => Ok(View::Down),
            _ => Err(format!("unknown view {s:?}: use up, gate or down")),
        }
    }
}

/// A direction decoded as it is (`pos`) or negated (`neg`). In a gated MLP the sign of an up row
/// means nothing by itself (negating the up row and the down column together leaves the model
/// unchanged), so both are decoded and every result says which one it shows.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Polarity {
    Pos,
    Neg,
}

impl Polarity {
    pub fn sign(&self) -> f32 {
        match self {
            Polarity::Pos => 1.0,
            Polarity::Neg => -1.0,
        }
    }
}

/// How a neuron's logits are scaled before the softmax behind its normalised probability
/// p(t) / mean(top-100 p). Within one neuron a positive scale keeps the order of its tokens; it
/// sets how sharply the score tells its top tokens apart, and so how neurons compare.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// The paper's: the logits `W_U · w` as they are (temperature 1).
    #[default]
    Raw,
    /// Each neuron's logits divided by their standard deviation over the vocabulary: in units of
    /// the neuron's own spread, whatever the size of its weights. For models whose raw logits
    /// spread too little for the softmax to tell tokens apart (Gemma 3: about 0.03 nat, so every
    /// score is about 1).
    Std,
}

impl Scale {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scale::Raw => "raw",
            Scale::Std => "std",
        }
    }
}

impl std::str::FromStr for Scale {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Scale::Raw),
            "std" => Ok(Scale::Std),
            _ => Err(format!("unknown scale {s:?}: use raw or std")),
        }
    }
}

/// Force one MLP neuron's activation to `value` at every position. Written `L:N:V` on the
/// command line and in URLs (e.g. `12:345:8.5`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClampSpec {
    pub layer: usize,
    pub neuron: usize,
    pub value: f32,
}

impl ClampSpec {
    /// Why a list of clamps is refused for naming one neuron twice (a request gives each
    /// neuron one value), or `None`: the check the server makes and the steer page makes first.
    pub fn duplicate(clamps: &[ClampSpec]) -> Option<String> {
        let (_, c) = clamps.iter().enumerate().find(|&(i, c)| clamps[..i].iter().any(|d| (d.layer, d.neuron) == (c.layer, c.neuron)))?;
        Some(format!("neuron {}:{} is clamped twice; give it one value", c.layer, c.neuron))
    }
}

impl std::fmt::Display for ClampSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.layer, self.neuron, self.value)
    }
}

impl std::str::FromStr for ClampSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        if parts.len() != 3 {
            return Err(format!("clamp {s:?} must be LAYER:NEURON:VALUE, e.g. 12:345:8.5"));
        }
        let layer = parts[0].parse().map_err(|_| format!("clamp {s:?}: layer {:?} is not a number", parts[0]))?;
        let neuron = parts[1].parse().map_err(|_| format!("clamp {s:?}: neuron {:?} is not a number", parts[1]))?;
        let value = parts[2].parse().map_err(|_| format!("clamp {s:?}: value {:?} is not a number", parts[2]))?;
        Ok(ClampSpec { layer, neuron, value })
    }
}

/// One chat turn.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// system, user or assistant.
    pub role: String,
    pub content: String,
}

/// A prompt: plain text, or a user message wrapped in the model's chat template.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    pub text: String,
    /// Render `text` (or `messages`) through the chat template. Default: true for models with one.
    #[serde(default)]
    pub chat: Option<bool>,
    /// Full conversation, instead of a single user message in `text`.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
}

/// Sampling settings. `temperature = 0` is greedy.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_max_new")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub max_new_tokens: usize,
}

fn default_seed() -> u64 {
    42
}
fn default_max_new() -> usize {
    128
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: None, seed: default_seed(), max_new_tokens: default_max_new() }
    }
}

/// `POST /api/models/{model}/generate` request; also what `flash-interp generate` runs.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: PromptSpec,
    #[serde(default)]
    pub clamps: Vec<ClampSpec>,
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Generate the normal and the steered answer side by side, with the same seed.
    #[serde(default)]
    pub compare: bool,
    /// Stream Server-Sent Events (token events, then a `done` event) instead of one JSON body.
    #[serde(default)]
    pub stream: bool,
    /// Independent samples, generated together as one batch: sample `i` samples with seed
    /// `seed + i` (the same answers as separate requests with those seeds). 1 to 8.
    #[serde(default = "one_sample")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 8))]
    pub samples: usize,
}

fn one_sample() -> usize {
    1
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_new_tokens` reached.
    Length,
    /// The client went away.
    Cancelled,
}

/// Which of a pair of answers a result or stream event belongs to.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    Normal,
    Steered,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Which sample (0-based; seed + sample).
    #[serde(default)]
    pub sample: usize,
    pub variant: Variant,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// One entry per token of `token_ids`: its probability and the runner-ups.
    pub steps: Vec<TokenStep>,
    pub stop: StopReason,
    /// Decoding speed in tokens per second (wall clock), for information.
    pub tokens_per_second: f64,
}

/// Response to a generate request: one completion, or two with `compare`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateResponse {
    pub prompt_tokens: usize,
    pub completions: Vec<Completion>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenProb {
    pub id: u32,
    pub text: String,
    pub prob: f32,
    pub logit: f32,
}

/// Next-token distribution of a prompt (top-k).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextTokenRequest {
    pub prompt: PromptSpec,
    #[serde(default)]
    pub clamps: Vec<ClampSpec>,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_top_k() -> usize {
    10
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NextTokenResponse {
    pub prompt_tokens: usize,
    pub top: Vec<TokenProb>,
}

/// `POST /api/models/{model}/sweep`: p(target next token) as one neuron is clamped to each value.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRequest {
    pub prompt: PromptSpec,
    pub layer: usize,
    pub neuron: usize,
    /// Must be a single token, e.g. " dog".
    pub target: String,
    pub values: Vec<f32>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub value: f32,
    pub prob: f32,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepResponse {
    pub target_id: u32,
    pub target_text: String,
    /// p(target) with no clamp.
    pub baseline: f32,
    /// The neuron's own activation at the last prompt position, unclamped.
    pub natural_value: f32,
    pub points: Vec<SweepPoint>,
}

/// A token and its text.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
}

/// One neuron found by a concept search.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    pub layer: usize,
    pub neuron: usize,
    /// The polarity whose decoding matched the concept.
    pub polarity: Polarity,
    /// Normalised probability p(t) / mean(top-100 p), summed over the concept's tokens.
    pub score: f32,
    /// The neuron's top tokens in that polarity.
    pub top_tokens: Vec<String>,
}

/// One layer's signed concept scores (|x| is the score, the sign says which polarity matched), as
/// the search plot draws them: every neuron, or at most a given number of points that keep the
/// plot's envelope (each of `points / 2` equal runs of neurons keeps its highest and its lowest).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerScores {
    /// Neurons in the layer.
    pub neurons: usize,
    /// The neurons `scores` holds, ascending; empty when it holds every neuron in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<u32>,
    pub scores: Vec<f32>,
}

impl LayerScores {
    /// Every neuron's score.
    pub fn full(scores: Vec<f32>) -> Self {
        Self { neurons: scores.len(), ids: Vec::new(), scores }
    }

    /// At most `points` of `scores` (0: all of them; 1 counts as 2): the layer is cut into `points / 2` runs of
    /// neurons as equal as can be, and each run keeps its highest and its lowest score, in neuron
    /// order. A line through them covers exactly the band the full line covers over each run, so
    /// a plot at screen resolution looks the same; the strongest neuron of every run survives.
    pub fn decimate(scores: &[f32], points: usize) -> Self {
        let n = scores.len();
        let runs = (points / 2).max(1);
        if points == 0 || n <= points.max(2) {
            return Self::full(scores.to_vec());
        }
        let mut ids = Vec::with_capacity(2 * runs);
        for r in 0..runs {
            let (a, b) = (r * n / runs, (r + 1) * n / runs);
            let (mut lo, mut hi) = (a, a);
            for i in a..b {
                // NaN never wins either comparison, so a run keeps a number whenever it has one.
                if scores[i] < scores[lo] || scores[lo].is_nan() {
                    lo = i;
                }
                if scores[i] > scores[hi] || scores[hi].is_nan() {
                    hi = i;
                }
            }
            ids.push(lo.min(hi) as u32);
            if lo != hi {
                ids.push(lo.max(hi) as u32);
            }
        }
        let scores = ids.iter().map(|&i| scores[i as usize]).collect();
        Self { neurons: n, ids, scores }
    }

    /// Whether every neuron is here.
    pub fn is_full(&self) -> bool {
        self.ids.is_empty() && self.scores.len() == self.neurons
    }

    /// (neuron, score) of every point held, in neuron order.
    pub fn points(&self) -> impl Iterator<Item = (usize, f32)> + '_ {
        self.scores.iter().enumerate().map(|(k, &s)| (self.ids.get(k).map_or(k, |&i| i as usize), s))
    }
}

/// Concept search: every neuron's score, per layer, and the strongest neurons.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResponse {
    pub tokens: Vec<TokenInfo>,
    pub view: View,
    pub final_norm: bool,
    /// Each layer's signed scores: neuron `n` scores |x| in its better polarity, and x is negated
    /// when that polarity is `neg`. Every neuron, or the plot's envelope (see [`LayerScores`]);
    /// the strongest neurons are exact in `top`.
    pub layers: Vec<LayerScores>,
    pub top: Vec<SearchHit>,
    /// The tokens are one phrase (scored together, see `analysis::search_phrase`), not alternatives.
    #[serde(default)]
    pub phrase: bool,
    /// How each neuron's logits were scaled for the scores (the request's, or the model's
    /// default: `std` when the map's raw logits are flat, see `analysis::default_scale`).
    #[serde(default)]
    pub scale: Scale,
}

/// A token of a decoded neuron direction.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenScore {
    pub id: u32,
    pub text: String,
    /// Softmax probability over the vocabulary.
    pub prob: f32,
    /// Normalised probability: prob / mean(top-100 prob) of the same decoding, after the
    /// detail's `scale` (with `std`, of the logits divided by their standard deviation).
    pub norm: f32,
}

/// Top tokens of one view in one polarity (`neg` lists the bottom tokens of the direction).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewTokens {
    pub view: View,
    pub polarity: Polarity,
    pub tokens: Vec<TokenScore>,
}

/// The neuron's natural activation (act(gate)·up) over all positions of a fixed set of prompts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActivationStats {
    pub mean: f32,
    pub std: f32,
    pub min: f32,
    pub max: f32,
    /// Positions the statistics are over.
    pub positions: usize,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimilarNeuron {
    pub layer: usize,
    pub neuron: usize,
    /// Cosine of the up rows (sign included: a negative cosine is a match in the other polarity).
    pub cosine: f32,
}

/// `GET /api/models/{model}/neurons/{layer}/{index}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronDetail {
    pub layer: usize,
    pub neuron: usize,
    pub final_norm: bool,
    pub views: Vec<ViewTokens>,
    pub activation: ActivationStats,
    pub similar: Vec<SimilarNeuron>,
    /// The neuron's class and moments in each view whose map is built (never waits for one).
    #[serde(default)]
    pub classes: Vec<ViewClass>,
    /// How the logits were scaled for the tokens' `norm` (the request's, or the model's search
    /// default when its up map is built; else `raw`).
    #[serde(default)]
    pub scale: Scale,
}

/// A neuron's weight statistics in one view (see [`NeuronClass`]).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ViewClass {
    pub view: View,
    pub class: NeuronClass,
    pub moments: Moments,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerAgreement {
    pub layer: usize,
    /// Neurons whose top token (up view, positive polarity) is the same in both models.
    pub same_top: usize,
    pub neurons: usize,
    pub share: f32,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangedNeuron {
    pub layer: usize,
    pub neuron: usize,
    /// Cosine between the neuron's up rows in the two models.
    pub cosine: f32,
    pub top_a: String,
    pub top_b: String,
}

/// Base vs instruct (the paper's §3.3): how many neurons kept their top token.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareResponse {
    pub model_a: String,
    pub model_b: String,
    pub layers: Vec<LayerAgreement>,
    pub overall_share: f32,
    /// The neurons whose up rows changed most (lowest cosine first).
    pub changed: Vec<ChangedNeuron>,
}

/// One loaded model, as listed by `GET /api/models`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Stable id used in every other endpoint and in permalinks.
    pub id: String,
    pub name: String,
    pub architecture: String,
    pub format: String,
    pub layers: usize,
    pub neurons_per_layer: usize,
    pub d_model: usize,
    pub vocab_size: usize,
    pub context: usize,
    pub chat: bool,
    /// Views whose neuron map is built and in memory.
    pub maps_ready: Vec<View>,
    /// Whether maps decode with the final RMSNorm folded in (the server's option).
    pub final_norm: bool,
    /// The scale a search of the up view uses by default (`std` where the raw logits are flat),
    /// once that map is in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_scale: Option<Scale>,
}

/// `GET /api/models/{model}/tokens?q=`: how a string tokenizes, and single tokens that start with it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub tokens: Vec<TokenInfo>,
    pub suggestions: Vec<TokenInfo>,
}

/// Final event of a streamed generation and body of a non-streamed one.
/// Streamed token events are `event: token` with a [`TokenEvent`] body.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// Which sample (0-based).
    #[serde(default)]
    pub sample: usize,
    pub variant: Variant,
    pub text: String,
    /// The tokens this text comes from: usually one; several when a character spans tokens.
    pub steps: Vec<TokenStep>,
}

/// Whether an answer mentions a word (case-insensitive, whole words: "dog" matches "Dogs!" but
/// not "hotdog"; a plural or possessive "s" is allowed).
pub fn mentions(text: &str, word: &str) -> bool {
    let w = word.trim().to_lowercase();
    if w.is_empty() {
        return false;
    }
    let t = text.to_lowercase();
    let is_word = |c: char| c.is_alphanumeric();
    let mut start = 0;
    while let Some(i) = t[start..].find(&w) {
        let (a, b) = (start + i, start + i + w.len());
        let before_ok = t[..a].chars().next_back().is_none_or(|c| !is_word(c));
        let rest = &t[b..];
        let rest = rest.strip_prefix("'s").or_else(|| rest.strip_prefix('s')).unwrap_or(rest);
        let after_ok = rest.chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            return true;
        }
        start = b;
    }
    false
}

/// A curated example of the home page's gallery: a concept, the neuron concept search finds for
/// it, a clamp that steers a prompt toward it, and what that clamp measurably does. The inputs
/// are chosen by hand; `measured` is written by `flash-interp gallery --write`, which reruns the
/// product's own sweep and steered samples, and checked by `flash-interp gallery` (and CI).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GalleryExample {
    pub title: String,
    /// What the example shows, honestly: where the steering goes, even when it is not exactly
    /// the concept.
    pub note: String,
    /// The concept search that finds the neuron (the search page's `q`).
    pub concept: String,
    pub view: View,
    pub layer: usize,
    pub neuron: usize,
    pub clamp: f32,
    pub prompt: String,
    /// Whether the prompt goes through the model's chat template.
    pub chat: bool,
    /// The next token whose probability the sweep measures (one token, e.g. " dog").
    pub target: String,
    /// The word counted in the answers ([`mentions`]).
    pub word: String,
    pub temperature: f64,
    pub max_tokens: usize,
    /// Normal/steered pairs, with seeds `seed`, `seed + 1`, … (as the steer page numbers them).
    pub samples: usize,
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<GalleryMeasured>,
}

impl GalleryExample {
    pub fn prompt_spec(&self) -> PromptSpec {
        PromptSpec { text: self.prompt.clone(), chat: Some(self.chat), messages: None }
    }
    pub fn clamp_spec(&self) -> ClampSpec {
        ClampSpec { layer: self.layer, neuron: self.neuron, value: self.clamp }
    }
    /// The sweep behind `p_normal` and `p_clamped`.
    pub fn sweep_request(&self) -> SweepRequest {
        SweepRequest { prompt: self.prompt_spec(), layer: self.layer, neuron: self.neuron, target: self.target.clone(), values: vec![self.clamp] }
    }
    /// Every sample's normal/steered pair, as one batch: what the steer page sends for the
    /// example's link.
    pub fn generate_request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt_spec(),
            clamps: vec![self.clamp_spec()],
            sampling: SamplingParams { temperature: self.temperature, top_p: None, seed: self.seed, max_new_tokens: self.max_tokens },
            compare: true,
            stream: true,
            samples: self.samples,
        }
    }
}

/// What a gallery example's clamp does, measured by the product.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GalleryMeasured {
    /// p(target) as the next token after the prompt, unclamped.
    pub p_normal: f32,
    /// p(target) with the neuron clamped to the example's value.
    pub p_clamped: f32,
    /// How many of the normal answers mention the word.
    pub normal_mentions: usize,
    /// How many of the steered answers mention the word.
    pub steered_mentions: usize,
    /// The first sample's answers.
    pub normal_answer: String,
    pub steered_answer: String,
}

/// `GET /api/models/{model}/gallery`: the curated examples verified on this model (none for a
/// model without any).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GalleryResponse {
    pub examples: Vec<GalleryExample>,
}

/// How many of the most likely tokens each [`TokenStep`] lists.
pub const STEP_TOP: usize = 5;

/// One generated token with its probability under the model and the tokens it beat, for the
/// steer view's hover.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenStep {
    pub id: u32,
    /// The token as the vocabulary spells it (" dog").
    pub token: String,
    /// What it added to the answer's text: usually `token`; empty while a character that spans
    /// tokens is incomplete (the token that completes it carries the whole character).
    pub text: String,
    /// Its probability under the model: the softmax of the logits at temperature 1, whatever
    /// the sampling temperature and top-p.
    pub prob: f32,
    /// The [`STEP_TOP`] most likely tokens at this position, most likely first (the chosen
    /// token among them when it was one of the most likely).
    pub top: Vec<TokenProb>,
}

/// Moments of a neuron's logits `W_U · w` over the whole vocabulary (positive polarity).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub mean: f32,
    pub std: f32,
    pub skew: f32,
    /// Not the excess: a Gaussian has 3.
    pub kurtosis: f32,
}

/// Neuron classes from weight statistics (Gurnee et al. 2024, "Universal Neurons in GPT2
/// Language Models"), read from the moments of the decoded direction over the vocabulary.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeuronClass {
    /// A few tokens far above the rest: kurtosis > [`NeuronClass::KURTOSIS`], positive skew.
    Prediction,
    /// A few tokens far below the rest: kurtosis > [`NeuronClass::KURTOSIS`], negative skew.
    Suppression,
    /// Not heavy-tailed but spread wide: std at least [`NeuronClass::PARTITION_STD`] times the
    /// median std of the view's neurons (it splits the vocabulary into large groups).
    Partition,
    Other,
}

impl NeuronClass {
    pub const KURTOSIS: f32 = 10.0;
    pub const PARTITION_STD: f32 = 2.0;
    pub const ALL: [NeuronClass; 4] = [NeuronClass::Prediction, NeuronClass::Suppression, NeuronClass::Partition, NeuronClass::Other];

    /// The class of a neuron with moments `m` in a view whose median std is `median_std`.
    /// Classes are of the positive polarity; the negative polarity swaps prediction and suppression.
    pub fn of(m: &Moments, median_std: f32) -> Self {
        if m.kurtosis > Self::KURTOSIS && m.skew > 0.0 {
            NeuronClass::Prediction
        } else if m.kurtosis > Self::KURTOSIS && m.skew < 0.0 {
            NeuronClass::Suppression
        } else if m.std > 0.0 && median_std > 0.0 && m.std >= Self::PARTITION_STD * median_std {
            NeuronClass::Partition
        } else {
            NeuronClass::Other
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            NeuronClass::Prediction => "prediction",
            NeuronClass::Suppression => "suppression",
            NeuronClass::Partition => "partition",
            NeuronClass::Other => "other",
        }
    }
}

impl std::str::FromStr for NeuronClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NeuronClass::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown class {s:?}: use prediction, suppression, partition or other"))
    }
}

/// Neurons of each class in one layer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerClassCounts {
    pub layer: usize,
    pub prediction: usize,
    pub suppression: usize,
    pub partition: usize,
    pub neurons: usize,
}

/// One neuron of a class, with what it decodes to.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassedNeuron {
    pub layer: usize,
    pub neuron: usize,
    pub moments: Moments,
    /// Top tokens of the polarity the class is about (negative for suppression neurons).
    pub top_tokens: Vec<String>,
}

/// `GET /api/models/{model}/classes`: per-layer counts of every class, and the strongest
/// neurons of one class (by kurtosis; by std for partition neurons).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassesResponse {
    pub view: View,
    pub final_norm: bool,
    pub kurtosis_threshold: f32,
    pub partition_std: f32,
    pub median_std: f32,
    pub layers: Vec<LayerClassCounts>,
    pub class: NeuronClass,
    pub neurons: Vec<ClassedNeuron>,
}

/// What a verification measures: the probability of one of several single tokens (summed), or
/// of a phrase of several tokens (the product of its teacher-forced next-token probabilities).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Concept {
    Tokens(Vec<String>),
    Phrase(String),
}

/// `POST /api/models/{model}/verify`: rank the map's candidates for a concept by what clamping
/// them does to the concept's probability after each prompt.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub concept: Concept,
    pub prompts: Vec<PromptSpec>,
    /// Candidates taken from the map (all views, both polarities), default 8.
    #[serde(default = "default_candidates")]
    pub candidates: usize,
    /// Clamp values per candidate, spread evenly over ±`range` × the neuron's largest natural
    /// |activation| (default 9 values, range 10).
    #[serde(default = "default_values")]
    pub values: usize,
    #[serde(default = "default_range")]
    pub range: f32,
}

fn default_candidates() -> usize {
    8
}
fn default_values() -> usize {
    9
}
fn default_range() -> f32 {
    10.0
}

/// One candidate, measured.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifiedNeuron {
    pub layer: usize,
    pub neuron: usize,
    /// The view and polarity whose decoding made it a candidate, its map score and rank (0 = best).
    pub view: View,
    pub polarity: Polarity,
    pub map_score: f32,
    pub map_rank: usize,
    /// The clamp value with the largest rise of log p(concept), averaged over the prompts, and
    /// that rise in nats (≤ 0 when no clamp raises it).
    pub best_value: f32,
    pub effect: f32,
    /// p(concept) at the best value (mean over prompts).
    pub best_prob: f32,
    /// p(concept) at every clamp value (mean over prompts).
    pub curve: Vec<SweepPoint>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// The concept's tokens (a phrase's in order).
    pub tokens: Vec<TokenInfo>,
    pub phrase: bool,
    /// p(concept) with no clamp (mean over prompts).
    pub baseline: f32,
    /// Candidates, the largest causal effect first.
    pub neurons: Vec<VerifiedNeuron>,
    /// The scale of the candidates' map scores (one for every view: `std` when any of the
    /// model's maps has flat raw logits, as a search's default).
    #[serde(default)]
    pub scale: Scale,
}

/// Every error answered by the API, and printed by the CLI with `--json`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    /// Percent done of the work the answer waits for (with code `map_building`: the map's build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
}

impl ApiError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), progress: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against brute force: the kept points are the runs' extremes, in order, within budget;
        /// the full layer comes back whole.
        #[test]
        fn decimated_layers_keep_every_runs_extremes(scores in prop::collection::vec(-50f32..50.0, 0..400), points in 0usize..300) {
            let d = LayerScores::decimate(&scores, points);
            prop_assert_eq!(d.neurons, scores.len());
            let got: Vec<(usize, f32)> = d.points().collect();
            if points == 0 || scores.len() <= points.max(2) {
                prop_assert!(d.is_full());
                prop_assert_eq!(got, scores.iter().copied().enumerate().collect::<Vec<_>>());
            } else {
                prop_assert!(!d.is_full() && got.len() <= points.max(2) && got.windows(2).all(|w| w[0].0 < w[1].0));
                prop_assert!(got.iter().all(|&(i, s)| scores[i] == s));
                let runs = (points / 2).max(1);
                for r in 0..runs {
                    let run = &scores[r * scores.len() / runs..(r + 1) * scores.len() / runs];
                    let inside: Vec<f32> = got.iter().filter(|(i, _)| (r * scores.len() / runs..(r + 1) * scores.len() / runs).contains(i)).map(|p| p.1).collect();
                    let (lo, hi) = run.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
                    prop_assert!(inside.len() <= 2 && inside.contains(&lo) && inside.contains(&hi), "run {}: {:?} of {:?}", r, inside, run);
                }
                let best = scores.iter().fold(0f32, |m, x| m.max(x.abs()));
                prop_assert!(got.iter().any(|p| p.1.abs() == best));
            }
            let back: LayerScores = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            prop_assert_eq!(back, d);
        }
    }

    #[test]
    fn decimation_skips_nan_and_the_full_form_omits_ids() {
        let d = LayerScores::decimate(&[f32::NAN, 1.0, f32::NAN, -2.0, 0.5, 0.1], 2);
        assert_eq!(d.points().collect::<Vec<_>>(), vec![(1, 1.0), (3, -2.0)]);
        assert_eq!(serde_json::to_string(&LayerScores::full(vec![1.0, -0.5])).unwrap(), r#"{"neurons":2,"scores":[1.0,-0.5]}"#);
    }

    #[test]
    fn clamp_spec_round_trips_through_its_text_form() {
        let c: ClampSpec = "12:345:-8.5".parse().unwrap();
        assert_eq!(c, ClampSpec { layer: 12, neuron: 345, value: -8.5 });
        assert_eq!(c.to_string().parse::<ClampSpec>().unwrap(), c);
        assert!("12:345".parse::<ClampSpec>().is_err());
        assert!("a:1:2".parse::<ClampSpec>().unwrap_err().contains("layer"));
    }

    #[test]
    fn linspace_hits_both_ends_and_stays_inside() {
        assert_eq!(linspace(-1.0, 1.0, 5), vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(linspace(5.0, -5.0, 3), vec![5.0, 0.0, -5.0]);
        // In f32, -999.99994 + 1999.99994 * 4 / 4 rounds to 1000.00006, past the clamp limit.
        let v = linspace(-999.99994, 1000.0, 5);
        assert_eq!((v[0], v[4]), (-999.99994, 1000.0));
        assert!(v.iter().all(|x| (-999.99994..=1000.0).contains(x)) && v.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        for (body, field) in [
            (r#"{"prompt":{"text":"hi"},"sampling":{"max_tokens":5}}"#, "max_tokens"),
            (r#"{"prompt":{"text":"hi"},"comapre":true}"#, "comapre"),
            (r#"{"prompt":{"text":"hi","chta":true}}"#, "chta"),
            (r#"{"prompt":{"text":"hi"},"clamps":[{"layer":1,"neuron":2,"value":3,"val":4}]}"#, "val"),
        ] {
            let e = serde_json::from_str::<GenerateRequest>(body).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown field `{field}`")), "{body}: {e}");
        }
        let e = serde_json::from_str::<SweepRequest>(r#"{"prompt":{"text":"x"},"layer":0,"neuron":0,"target":"a","values":[1],"x":1}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field `x`"));
    }

    #[test]
    fn neuron_classes_follow_their_thresholds() {
        let m = |std: f32, skew: f32, kurtosis: f32| Moments { mean: 0.0, std, skew, kurtosis };
        assert_eq!(NeuronClass::of(&m(1.0, 2.0, 11.0), 1.0), NeuronClass::Prediction);
        assert_eq!(NeuronClass::of(&m(1.0, -2.0, 11.0), 1.0), NeuronClass::Suppression);
        assert_eq!(NeuronClass::of(&m(1.0, 2.0, 9.0), 1.0), NeuronClass::Other);
        assert_eq!(NeuronClass::of(&m(2.0, 0.0, 3.0), 1.0), NeuronClass::Partition);
        // Dead neurons (std 0) are not partition neurons, even when most of the view is dead.
        assert_eq!(NeuronClass::of(&m(0.0, 0.0, 0.0), 0.0), NeuronClass::Other);
        assert_eq!("suppression".parse::<NeuronClass>(), Ok(NeuronClass::Suppression));
        assert!("teacher".parse::<NeuronClass>().is_err());
    }

    #[test]
    fn generate_request_defaults_fill_in() {
        let r: GenerateRequest = serde_json::from_str(r#"{"prompt":{"text":"hi"}}"#).unwrap();
        assert_eq!(r.sampling, SamplingParams::default());
        assert!(r.clamps.is_empty() && !r.compare && r.prompt.chat.is_none());
    }
}
