//! URL state of every page. Each page's whole state is a query string (plus the path), parsed
//! here into a typed struct and formatted back, so every view is a permalink. Pure Rust with no
//! browser calls: the round-trips are unit-tested natively (`cargo test -p frontend`).
//!
//! Defaults are left out of the URL so links stay short; a value that does not parse is an error
//! the page shows ("this link is malformed: …"), never silently replaced.

use serde::{Deserialize, Serialize};
use serde::{Deserializer, Serializer};
use shared::{limits, ClampSpec, Concept, GalleryExample, NeuronClass, Polarity, PromptSpec, Scale, SweepRequest, VerifyRequest, View};

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A checkbox in the URL: `key=1` when on, left out when off (`true`/`false`/`0` are read too).
mod flag {
    use super::*;

    pub fn serialize<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if *v { "1" } else { "0" })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        let v = String::deserialize(d)?;
        match v.as_str() {
            "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            _ => Err(serde::de::Error::custom(format!("{v:?} is not a checkbox value (use 1 or 0)"))),
        }
    }
}

/// Parse a query string (with or without its leading `?`).
pub fn parse<T: for<'de> Deserialize<'de>>(search: &str) -> Result<T, String> {
    serde_urlencoded::from_str(search.strip_prefix('?').unwrap_or(search)).map_err(|e| format!("this link is malformed: {e}"))
}

fn query<T: Serialize>(path: &str, state: &T) -> String {
    let q = serde_urlencoded::to_string(state).unwrap_or_default();
    if q.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{q}")
    }
}

/// Percent-encode one path segment (a model id in an API path).
pub fn segment(s: &str) -> String {
    serde_urlencoded::to_string([("", s)]).unwrap_or_default().trim_start_matches('=').replace('+', "%20")
}

/// Which polarity a search shows: the stronger of the two (default), or one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolarityChoice {
    #[default]
    Both,
    Pos,
    Neg,
}

impl PolarityChoice {
    pub fn polarity(self) -> Option<Polarity> {
        match self {
            PolarityChoice::Both => None,
            PolarityChoice::Pos => Some(Polarity::Pos),
            PolarityChoice::Neg => Some(Polarity::Neg),
        }
    }
}

fn default_view() -> View {
    View::Up
}
fn is_up(v: &View) -> bool {
    *v == View::Up
}

/// The prompt a causal verification runs when the search page's URL names none.
/// A prompt neutral to any concept, read as plain text: the concept is measured as what comes
/// next. (Through a chat template the answer's first token is "I" or "The" whatever the concept,
/// and every candidate's effect would be measured on a probability of ~1e-8.)
pub const DEFAULT_VERIFY_PROMPT: &str = "The word I am thinking of is";

/// Candidates a causal verification clamps (the API's default).
pub const VERIFY_CANDIDATES: usize = 8;

/// Concept search, at `/`: `?model=…&q=%20dog,%20dogs&view=down&polarity=pos`; `phrase=1` reads
/// `q` as one phrase (` Sherlock Holmes`) instead of comma-separated alternatives; `vp` is the
/// prompt of the causal verification (run only on request, never by opening the link).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub q: String,
    #[serde(default, skip_serializing_if = "is_default", with = "flag")]
    pub phrase: bool,
    #[serde(default = "default_view", skip_serializing_if = "is_up")]
    pub view: View,
    #[serde(default, skip_serializing_if = "is_default")]
    pub polarity: PolarityChoice,
    /// How neurons' logits are scaled for the scores; `None`: the model's default (the server's
    /// choice, which the results name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vp: String,
}

impl Default for SearchState {
    fn default() -> Self {
        Self { model: None, q: String::new(), phrase: false, view: View::Up, polarity: PolarityChoice::Both, scale: None, vp: String::new() }
    }
}

/// A page whose URL state names the model it shows (`model=`, the server's first when absent).
pub trait ModelPage: Serialize + Sized {
    /// The page's path.
    const PATH: &'static str;
    fn model_mut(&mut self) -> &mut Option<String>;
    /// The page's link: its path and state.
    fn href(&self) -> String {
        query(Self::PATH, self)
    }
}

impl ModelPage for SearchState {
    const PATH: &'static str = "/";
    fn model_mut(&mut self) -> &mut Option<String> {
        &mut self.model
    }
}

impl ModelPage for ClassesState {
    const PATH: &'static str = "/classes";
    fn model_mut(&mut self) -> &mut Option<String> {
        &mut self.model
    }
}

impl SearchState {
    /// The concept's tokens: commas separate; spaces inside a token are kept (" dog"). A phrase
    /// is one piece, commas and all.
    pub fn tokens(&self) -> Vec<String> {
        if self.phrase {
            if self.q.trim().is_empty() {
                Vec::new()
            } else {
                vec![self.q.clone()]
            }
        } else {
            split_tokens(&self.q)
        }
    }
    /// The concept as the API takes it; `None` while the text box is empty.
    pub fn concept(&self) -> Option<Concept> {
        let mut tokens = self.tokens();
        match (self.phrase, tokens.is_empty()) {
            (_, true) => None,
            (true, false) => tokens.pop().map(Concept::Phrase),
            (false, false) => Some(Concept::Tokens(tokens)),
        }
    }
    /// What the map results depend on besides the model: the state without its model and its
    /// verification prompt (so editing the prompt, or naming the model picked anyway, refetches nothing).
    pub fn search_key(&self) -> Self {
        Self { model: None, vp: String::new(), ..self.clone() }
    }
    /// The API URL of this search (the model must be known).
    pub fn api_url(&self, model: &str, top: usize) -> String {
        #[derive(Serialize)]
        struct Q<'a> {
            tokens: &'a str,
            #[serde(skip_serializing_if = "is_default")]
            phrase: bool,
            view: View,
            top: usize,
            #[serde(skip_serializing_if = "Option::is_none")]
            polarity: Option<Polarity>,
            #[serde(skip_serializing_if = "Option::is_none")]
            scale: Option<Scale>,
        }
        let tokens = self.tokens().join(",");
        let q = Q { tokens: &tokens, phrase: self.phrase, view: self.view, top, polarity: self.polarity.polarity(), scale: self.scale };
        query(&format!("/api/models/{}/search", segment(model)), &q)
    }
    /// The prompt a verification runs (the page's default when the URL has none).
    pub fn verify_prompt(&self) -> &str {
        if self.vp.trim().is_empty() {
            DEFAULT_VERIFY_PROMPT
        } else {
            &self.vp
        }
    }
    /// The URL of the causal verification of this search's concept.
    pub fn verify_url(model: &str) -> String {
        format!("/api/models/{}/verify", segment(model))
    }
    /// The causal verification of this search's concept after its prompt (plain text, no chat
    /// template), checked as the API would before anything is sent.
    pub fn verify_request(&self) -> Result<VerifyRequest, String> {
        let concept = self.concept().ok_or("type a concept first")?;
        if let Concept::Phrase(p) = &concept {
            if p.len() > limits::MAX_PROMPT_BYTES {
                return Err("the phrase is too long".into());
            }
        }
        if self.verify_prompt().len() > limits::MAX_PROMPT_BYTES {
            return Err(format!("the prompt is longer than {} bytes", limits::MAX_PROMPT_BYTES));
        }
        Ok(VerifyRequest {
            concept,
            prompts: vec![PromptSpec { text: self.verify_prompt().to_owned(), chat: Some(false), messages: None }],
            candidates: VERIFY_CANDIDATES,
            values: 9,
            range: 10.0,
        })
    }
    /// The word a steered answer should mention: the first token, or the phrase, trimmed.
    pub fn word(&self) -> String {
        self.tokens().first().map(|t| t.trim().to_owned()).unwrap_or_default()
    }
    /// The steer page with one clamp (a verified neuron at its best value), this search's
    /// verification prompt and its concept as the word to count.
    pub fn steer_with(&self, model: &str, clamp: ClampSpec) -> SteerState {
        let mut s = SteerState { model: Some(model.to_owned()), prompt: self.verify_prompt().to_owned(), word: self.word(), ..Default::default() };
        let value = ((clamp.value * 100.0).round() / 100.0).clamp(-limits::MAX_CLAMP_ABS, limits::MAX_CLAMP_ABS);
        s.set_clamps(&[ClampSpec { value, ..clamp }]);
        s
    }
}

/// Split the text box into tokens: commas separate, empty pieces are dropped, spaces are kept.
pub fn split_tokens(q: &str) -> Vec<String> {
    q.split(',').filter(|t| !t.trim().is_empty()).map(|t| t.to_owned()).collect()
}

/// The piece of the text box being typed (after the last comma), and what comes before it.
pub fn last_piece(q: &str) -> (&str, &str) {
    match q.rfind(',') {
        Some(i) => (&q[..=i], &q[i + 1..]),
        None => ("", q),
    }
}

/// The text box with its last piece replaced by a suggested token (what a suggestion offers).
pub fn complete_with(q: &str, token: &str) -> String {
    format!("{}{}", last_piece(q).0, token)
}

/// Sweep settings of the neuron page.
pub const DEFAULT_SWEEP_PROMPT: &str = "My favourite animal is the";

fn default_from() -> f32 {
    -20.0
}
fn default_to() -> f32 {
    20.0
}
fn default_steps() -> usize {
    17
}

/// Neuron page, at `/neuron/{layer}/{index}`: `?model=…` plus the sweep panel
/// (`target`, `prompt`, `from`, `to`, `steps`, `log`); the sweep runs when a target is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronState {
    #[serde(skip)]
    pub layer: usize,
    #[serde(skip)]
    pub neuron: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default = "default_from")]
    pub from: f32,
    #[serde(default = "default_to")]
    pub to: f32,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default, skip_serializing_if = "is_default")]
    pub log: bool,
    /// How the bars' logits are scaled; `None`: the model's default (as for [`SearchState::scale`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
}

impl NeuronState {
    pub fn new(layer: usize, neuron: usize, model: Option<String>) -> Self {
        Self {
            layer,
            neuron,
            model,
            target: String::new(),
            prompt: None,
            from: default_from(),
            to: default_to(),
            steps: default_steps(),
            log: false,
            scale: None,
        }
    }
    /// The same neuron's page with the bars on `scale` (a search's links keep its choice).
    pub fn with_scale(self, scale: Option<Scale>) -> Self {
        Self { scale, ..self }
    }
    /// The page's state from its path parameters and query string.
    pub fn parse(layer: usize, neuron: usize, search: &str) -> Result<Self, String> {
        let mut s: NeuronState = parse(search)?;
        s.layer = layer;
        s.neuron = neuron;
        Ok(s)
    }
    pub fn href(&self) -> String {
        // The sweep settings are only worth a place in the URL once a sweep is asked for.
        if self.target.is_empty() {
            #[derive(Serialize)]
            struct M<'a> {
                #[serde(skip_serializing_if = "Option::is_none")]
                model: &'a Option<String>,
                #[serde(skip_serializing_if = "Option::is_none")]
                scale: Option<Scale>,
            }
            return query(&format!("/neuron/{}/{}", self.layer, self.neuron), &M { model: &self.model, scale: self.scale });
        }
        query(&format!("/neuron/{}/{}", self.layer, self.neuron), self)
    }
    pub fn sweep_prompt(&self) -> &str {
        self.prompt.as_deref().unwrap_or(DEFAULT_SWEEP_PROMPT)
    }
    /// The clamp values to sweep: `steps` evenly spaced values from `from` to `to`.
    pub fn sweep_values(&self) -> Result<Vec<f32>, String> {
        sweep_values(self.from, self.to, self.steps)
    }
    /// The API URL of this neuron's detail with `tokens` tokens per view and polarity.
    pub fn detail_url(&self, model: &str, tokens: usize) -> String {
        let scale = self.scale.map(|s| format!("&scale={}", s.as_str())).unwrap_or_default();
        format!("/api/models/{}/neurons/{}/{}?tokens={tokens}{scale}", segment(model), self.layer, self.neuron)
    }
    /// The URL of a clamp sweep.
    pub fn sweep_url(model: &str) -> String {
        format!("/api/models/{}/sweep", segment(model))
    }
    /// The clamp sweep this state asks for (its prompt read as plain text), checked as the API
    /// would before anything is sent.
    pub fn sweep_request(&self) -> Result<SweepRequest, String> {
        Ok(SweepRequest {
            prompt: PromptSpec { text: self.sweep_prompt().to_owned(), chat: Some(false), messages: None },
            layer: self.layer,
            neuron: self.neuron,
            target: self.target.clone(),
            values: self.sweep_values()?,
        })
    }
}

/// `steps` evenly spaced values from `from` to `to` (both included), checked against the API's
/// limits so a bad range is refused before a request is sent.
pub fn sweep_values(from: f32, to: f32, steps: usize) -> Result<Vec<f32>, String> {
    if !from.is_finite() || !to.is_finite() {
        return Err("the sweep range must be numbers".into());
    }
    if from.abs() > limits::MAX_CLAMP_ABS || to.abs() > limits::MAX_CLAMP_ABS {
        return Err(format!("clamp values must be within ±{}", limits::MAX_CLAMP_ABS));
    }
    if !(2..=limits::MAX_SWEEP_VALUES).contains(&steps) {
        return Err(format!("a sweep takes 2 to {} values", limits::MAX_SWEEP_VALUES));
    }
    if from >= to {
        return Err("the sweep's start must be below its end".into());
    }
    Ok(shared::linspace(from, to, steps))
}

pub const DEFAULT_STEER_PROMPT: &str = "What is your favourite animal?";

fn default_max() -> usize {
    64
}
fn is_default_max(v: &usize) -> bool {
    *v == default_max()
}
fn default_seed() -> u64 {
    42
}
fn is_default_seed(v: &u64) -> bool {
    *v == default_seed()
}
fn default_n() -> usize {
    1
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn default_chat() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}

/// Most samples one steer page runs at once.
pub const MAX_SAMPLES: usize = 8;

/// Steer page, at `/steer`: `?model=…&prompt=…&clamps=29:808:12,3:4:-2&seed=42&temp=0.8&max=64&n=4&word=dog`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteerState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    /// `L:N:V` clamps, comma-separated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub clamps: String,
    #[serde(default = "default_seed", skip_serializing_if = "is_default_seed")]
    pub seed: u64,
    #[serde(default, skip_serializing_if = "is_default")]
    pub temp: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default = "default_max", skip_serializing_if = "is_default_max")]
    pub max: usize,
    /// Samples to draw (seeds `seed`, `seed + 1`, …).
    #[serde(default = "default_n", skip_serializing_if = "is_one")]
    pub n: usize,
    /// Wrap the prompt in the chat template.
    #[serde(default = "default_chat", skip_serializing_if = "is_true")]
    pub chat: bool,
    /// A word to count in the answers ("how often does it talk about dogs").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub word: String,
}

impl Default for SteerState {
    fn default() -> Self {
        Self {
            model: None,
            prompt: String::new(),
            clamps: String::new(),
            seed: default_seed(),
            temp: 0.0,
            top_p: None,
            max: default_max(),
            n: 1,
            chat: true,
            word: String::new(),
        }
    }
}

impl SteerState {
    pub fn href(&self) -> String {
        query("/steer", self)
    }
    /// The steer page of a gallery example: the very samples its stored figures count.
    pub fn from_gallery(ex: &GalleryExample, model: Option<String>) -> Self {
        Self {
            model,
            prompt: ex.prompt.clone(),
            clamps: format_clamps(&[ex.clamp_spec()]),
            seed: ex.seed,
            temp: ex.temperature,
            top_p: None,
            max: ex.max_tokens,
            n: ex.samples,
            chat: ex.chat,
            word: ex.word.clone(),
        }
    }
    pub fn clamp_list(&self) -> Result<Vec<ClampSpec>, String> {
        parse_clamps(&self.clamps)
    }
    pub fn set_clamps(&mut self, clamps: &[ClampSpec]) {
        self.clamps = format_clamps(clamps);
    }
    /// The prompt to run (the page's default when the URL has none).
    pub fn prompt_text(&self) -> &str {
        if self.prompt.trim().is_empty() {
            DEFAULT_STEER_PROMPT
        } else {
            &self.prompt
        }
    }
    /// Check what the API would refuse, so the page says so before sending anything.
    pub fn validate(&self) -> Result<Vec<ClampSpec>, String> {
        let clamps = self.clamp_list()?;
        if clamps.is_empty() {
            return Err("add at least one clamp to compare a steered answer with the normal one".into());
        }
        if clamps.len() > limits::MAX_CLAMPS {
            return Err(format!("at most {} clamps", limits::MAX_CLAMPS));
        }
        if let Some(c) = clamps.iter().find(|c| !c.value.is_finite() || c.value.abs() > limits::MAX_CLAMP_ABS) {
            return Err(format!("clamp {c}: values must be within ±{}", limits::MAX_CLAMP_ABS));
        }
        if let Some(why) = ClampSpec::duplicate(&clamps) {
            return Err(why);
        }
        if !(1..=MAX_SAMPLES).contains(&self.n) {
            return Err(format!("samples must be between 1 and {MAX_SAMPLES}"));
        }
        if !(1..=limits::MAX_NEW_TOKENS).contains(&self.max) {
            return Err(format!("max tokens must be between 1 and {}", limits::MAX_NEW_TOKENS));
        }
        if !(0.0..=limits::MAX_TEMPERATURE).contains(&self.temp) {
            return Err(format!("temperature must be between 0 and {}", limits::MAX_TEMPERATURE));
        }
        Ok(clamps)
    }
    /// The URL of a generation.
    pub fn generate_url(model: &str) -> String {
        format!("/api/models/{}/generate", segment(model))
    }
    /// The API request of every sample (sample `i` samples with seed `seed + i`), one batch,
    /// streamed, normal and steered side by side.
    pub fn request(&self, clamps: Vec<ClampSpec>) -> shared::GenerateRequest {
        shared::GenerateRequest {
            prompt: shared::PromptSpec { text: self.prompt_text().to_owned(), chat: Some(self.chat), messages: None },
            clamps,
            sampling: shared::SamplingParams { temperature: self.temp, top_p: self.top_p, seed: self.seed, max_new_tokens: self.max },
            compare: true,
            stream: true,
            samples: self.n,
        }
    }
}

pub fn parse_clamps(s: &str) -> Result<Vec<ClampSpec>, String> {
    s.split(',').filter(|c| !c.trim().is_empty()).map(|c| c.parse::<ClampSpec>()).collect()
}

pub fn format_clamps(clamps: &[ClampSpec]) -> String {
    clamps.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
}

pub use shared::mentions;

fn default_class() -> NeuronClass {
    NeuronClass::Prediction
}
fn is_prediction(c: &NeuronClass) -> bool {
    *c == NeuronClass::Prediction
}
fn default_down() -> View {
    View::Down
}
fn is_down(v: &View) -> bool {
    *v == View::Down
}

/// Neuron classes, at `/classes?model=…&view=up&class=suppression` (defaults: the down view, the
/// prediction class).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassesState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default = "default_down", skip_serializing_if = "is_down")]
    pub view: View,
    #[serde(default = "default_class", skip_serializing_if = "is_prediction")]
    pub class: NeuronClass,
}

impl Default for ClassesState {
    fn default() -> Self {
        Self { model: None, view: View::Down, class: NeuronClass::Prediction }
    }
}

impl ClassesState {
    /// The API URL of this page's classes (the model must be known).
    pub fn api_url(&self, model: &str, top: usize) -> String {
        #[derive(Serialize)]
        struct Q {
            view: View,
            class: NeuronClass,
            top: usize,
        }
        query(&format!("/api/models/{}/classes", segment(model)), &Q { view: self.view, class: self.class, top })
    }
}

/// Compare page, at `/compare?a=…&b=…`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CompareState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<String>,
}

impl CompareState {
    pub fn href(&self) -> String {
        query("/compare", self)
    }
    /// The API URL of the comparison with `top` changed neurons; `None` until both models are chosen.
    pub fn api_url(&self, top: usize) -> Option<String> {
        let (a, b) = (self.a.as_deref()?, self.b.as_deref()?);
        Some(format!("/api/compare?a={}&b={}&top={top}", segment(a), segment(b)))
    }
}

/// One parameter of a query string, decoded.
pub fn query_param(search: &str, name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(search.strip_prefix('?').unwrap_or(search)).unwrap_or_default();
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// A page's path with its `model` parameter replaced (the model picker's links).
pub fn with_model(path: &str, search: &str, model: &str) -> String {
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(search.strip_prefix('?').unwrap_or(search)).unwrap_or_default();
    pairs.retain(|(k, _)| k != "model");
    pairs.insert(0, ("model".into(), model.into()));
    query(path, &pairs)
}

/// The query key that renders a page as an iframe embed (`embed=1`).
pub const EMBED_KEY: &str = "embed";

/// Whether a query string asks for the embed rendering (`embed=1` or `embed=true`).
pub fn is_embed(search: &str) -> bool {
    matches!(query_param(search, EMBED_KEY).as_deref(), Some("1" | "true"))
}

/// A page's URL (`path` plus its query string) as its embed: the same query with `embed=1`.
pub fn embed_url(path: &str, search: &str) -> String {
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(search.strip_prefix('?').unwrap_or(search)).unwrap_or_default();
    pairs.retain(|(k, _)| k != EMBED_KEY);
    pairs.push((EMBED_KEY.into(), "1".into()));
    query(path, &pairs)
}

/// The iframe HTML that embeds the page at `url` (absolute), `height` pixels high.
pub fn iframe_snippet(url: &str, height: u32, title: &str) -> String {
    let attr = |s: &str| s.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;");
    format!(
        r#"<iframe src="{}" title="{}" width="100%" height="{height}" style="border:0;max-width:960px" loading="lazy"></iframe>"#,
        attr(url),
        attr(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gallery_steer_link_runs_the_samples_the_gallery_counts() {
        let ex: GalleryExample = serde_json::from_value(serde_json::json!({
            "title": "t", "note": "n", "concept": " dog", "view": "down", "layer": 29, "neuron": 808, "clamp": 12.5,
            "prompt": "Tell me a story.", "chat": false, "target": " dog", "word": "dog", "temperature": 0.8, "max_tokens": 40,
            "samples": 8, "seed": 3
        }))
        .unwrap();
        let st = SteerState::from_gallery(&ex, Some("m".into()));
        let back: SteerState = parse(st.href().trim_start_matches("/steer")).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.request(back.validate().unwrap()), ex.generate_request());
    }

    #[test]
    fn embed_links() {
        assert!(is_embed("?embed=1") && is_embed("q=%20dog&embed=true"));
        assert!(!is_embed("") && !is_embed("?embed=0") && !is_embed("?embedded=1"));
        assert_eq!(embed_url("/neuron/29/808", ""), "/neuron/29/808?embed=1");
        assert_eq!(embed_url("/", "?q=%20dog&embed=0&view=down"), "/?q=+dog&view=down&embed=1");
        // The page state beneath an embed parses as without it.
        let s: SearchState = parse("q=+dog&view=down").unwrap();
        assert_eq!(s.q, " dog");
        let snippet = iframe_snippet("https://h/?q=+dog&embed=1", 480, "Concept \"dog\" <b>");
        assert_eq!(
            snippet,
            r#"<iframe src="https://h/?q=+dog&amp;embed=1" title="Concept &quot;dog&quot; &lt;b>" width="100%" height="480" style="border:0;max-width:960px" loading="lazy"></iframe>"#
        );
    }

    #[test]
    fn search_state_round_trips() {
        let cases = [
            SearchState::default(),
            SearchState {
                model: Some("smollm2-135m-instruct.q4-1".into()),
                q: " dog, dogs,puppy".into(),
                view: View::Down,
                polarity: PolarityChoice::Neg,
                ..Default::default()
            },
            SearchState { model: None, q: "a&b=c?d#e%f+g ü 🐶".into(), view: View::Gate, polarity: PolarityChoice::Pos, ..Default::default() },
            SearchState { q: " Sherlock Holmes, again".into(), phrase: true, vp: "Who is the detective?".into(), ..Default::default() },
            SearchState { q: " dog".into(), scale: Some(Scale::Std), ..Default::default() },
            SearchState { q: " dog".into(), scale: Some(Scale::Raw), ..Default::default() },
        ];
        for s in cases {
            let href = s.href();
            let (path, q) = href.split_once('?').unwrap_or((&href, ""));
            assert_eq!(path, "/");
            assert_eq!(parse::<SearchState>(q).unwrap(), s, "{href}");
        }
    }

    #[test]
    fn search_state_defaults_stay_out_of_the_url() {
        assert_eq!(SearchState::default().href(), "/");
        let s = SearchState { q: " dog".into(), ..Default::default() };
        assert_eq!(s.href(), "/?q=+dog");
        // Links written by hand with %20 parse the same as the + form.
        assert_eq!(parse::<SearchState>("?q=%20dog").unwrap(), s);
    }

    #[test]
    fn malformed_links_are_errors_not_defaults() {
        let e = parse::<SearchState>("view=sideways").unwrap_err();
        assert!(e.contains("malformed") && e.contains("sideways"), "{e}");
        assert!(parse::<SteerState>("seed=-1").is_err());
        assert!(parse::<NeuronState>("steps=many").is_err());
    }

    #[test]
    fn search_api_url_encodes_tokens() {
        let s = SearchState { q: " dog,&x".into(), polarity: PolarityChoice::Pos, ..Default::default() };
        assert_eq!(s.api_url("m/1", 100), "/api/models/m%2F1/search?tokens=+dog%2C%26x&view=up&top=100&polarity=pos");
        let both = SearchState { q: "cat".into(), view: View::Down, ..Default::default() };
        assert_eq!(both.api_url("m", 5), "/api/models/m/search?tokens=cat&view=down&top=5");
        let std = SearchState { q: "cat".into(), scale: Some(Scale::Std), ..Default::default() };
        assert_eq!(std.href(), "/?q=cat&scale=std");
        assert_eq!(std.api_url("m", 5), "/api/models/m/search?tokens=cat&view=up&top=5&scale=std");
        assert!(parse::<SearchState>("q=cat&scale=loud").is_err());
    }

    #[test]
    fn phrase_searches_keep_the_text_whole() {
        let s = SearchState { q: " Sherlock Holmes, esq.".into(), phrase: true, ..Default::default() };
        assert_eq!(s.href(), "/?q=+Sherlock+Holmes%2C+esq.&phrase=1");
        assert_eq!(parse::<SearchState>("q=+Sherlock+Holmes%2C+esq.&phrase=1").unwrap(), s);
        assert_eq!(parse::<SearchState>("q=+Sherlock+Holmes%2C+esq.&phrase=true").unwrap(), s);
        assert!(!parse::<SearchState>("phrase=0").unwrap().phrase);
        assert!(parse::<SearchState>("phrase=yes").unwrap_err().contains("malformed"));
        assert_eq!(s.tokens(), vec![" Sherlock Holmes, esq."]);
        assert_eq!(s.concept(), Some(Concept::Phrase(" Sherlock Holmes, esq.".into())));
        assert_eq!(s.api_url("m", 50), "/api/models/m/search?tokens=+Sherlock+Holmes%2C+esq.&phrase=true&view=up&top=50");
        assert_eq!(SearchState { q: "  ".into(), phrase: true, ..Default::default() }.concept(), None);
        let t = SearchState { q: " dog, dogs".into(), ..Default::default() };
        assert_eq!(t.concept(), Some(Concept::Tokens(vec![" dog".into(), " dogs".into()])));
    }

    #[test]
    fn verify_requests_and_steer_links() {
        let s = SearchState { model: Some("m".into()), q: " dog, dogs".into(), ..Default::default() };
        let r = s.verify_request().unwrap();
        assert_eq!(r.concept, Concept::Tokens(vec![" dog".into(), " dogs".into()]));
        assert_eq!(r.prompts.len(), 1);
        assert_eq!(r.prompts[0].text, DEFAULT_VERIFY_PROMPT);
        assert_eq!(r.candidates, VERIFY_CANDIDATES);
        assert!(SearchState::default().verify_request().is_err());
        let p = SearchState { q: " Sherlock Holmes".into(), phrase: true, vp: "Who solved it?".into(), ..Default::default() };
        assert_eq!(p.verify_request().unwrap().concept, Concept::Phrase(" Sherlock Holmes".into()));
        assert_eq!(p.verify_request().unwrap().prompts[0].text, "Who solved it?");
        assert_eq!(SearchState::verify_url("a b"), "/api/models/a%20b/verify");
        // The verification prompt never changes the map search.
        assert_eq!(p.search_key(), SearchState { vp: String::new(), ..p.clone() });
        assert_eq!(s.search_key().model, None);
        let steer = s.steer_with("m", ClampSpec { layer: 3, neuron: 7, value: 12.3456 });
        assert_eq!(steer.clamps, "3:7:12.35");
        assert_eq!(steer.word, "dog");
        assert_eq!(steer.prompt_text(), DEFAULT_VERIFY_PROMPT);
        assert_eq!(p.steer_with("m", ClampSpec { layer: 0, neuron: 1, value: -2.0 }).word, "Sherlock Holmes");
    }

    #[test]
    fn classes_state_round_trips() {
        assert_eq!(ClassesState::default().href(), "/classes");
        let s = ClassesState { model: Some("m".into()), view: View::Up, class: NeuronClass::Suppression };
        assert_eq!(s.href(), "/classes?model=m&view=up&class=suppression");
        assert_eq!(parse::<ClassesState>("model=m&view=up&class=suppression").unwrap(), s);
        assert_eq!(ClassesState::default().api_url("a/b", 20), "/api/models/a%2Fb/classes?view=down&class=prediction&top=20");
        assert!(parse::<ClassesState>("class=predictive").unwrap_err().contains("malformed"));
    }

    #[test]
    fn token_splitting_and_completion() {
        assert_eq!(split_tokens(" dog, dogs,,puppy ,"), vec![" dog", " dogs", "puppy "]);
        assert!(split_tokens(" , ").is_empty());
        assert_eq!(last_piece(" dog, pu"), (" dog,", " pu"));
        assert_eq!(last_piece("pu"), ("", "pu"));
        assert_eq!(complete_with(" dog, pu", " puppy"), " dog, puppy");
        assert_eq!(complete_with("ca", "cat"), "cat");
    }

    #[test]
    fn neuron_state_round_trips() {
        let plain = NeuronState::new(29, 808, Some("m".into()));
        assert_eq!(plain.href(), "/neuron/29/808?model=m");
        assert_eq!(NeuronState::parse(29, 808, "model=m").unwrap(), plain);
        let sweep = NeuronState { target: " dog".into(), prompt: Some("I like the".into()), from: -5.5, to: 30.0, steps: 9, log: true, ..plain };
        let href = sweep.href();
        let q = href.split_once('?').unwrap().1;
        assert_eq!(NeuronState::parse(29, 808, q).unwrap(), sweep, "{href}");
        assert_eq!(NeuronState::new(0, 1, None).href(), "/neuron/0/1");
        let raw = NeuronState::new(29, 808, Some("m".into())).with_scale(Some(Scale::Raw));
        assert_eq!(raw.href(), "/neuron/29/808?model=m&scale=raw");
        assert_eq!(NeuronState::parse(29, 808, "model=m&scale=raw").unwrap(), raw);
        assert_eq!(raw.detail_url("m", 10), "/api/models/m/neurons/29/808?tokens=10&scale=raw");
    }

    #[test]
    fn neuron_api_urls_and_sweep_requests() {
        let s = NeuronState { target: " dog".into(), from: -1.0, to: 1.0, steps: 3, ..NeuronState::new(29, 808, None) };
        assert_eq!(s.detail_url("a b", 10), "/api/models/a%20b/neurons/29/808?tokens=10");
        assert_eq!(NeuronState::sweep_url("m/1"), "/api/models/m%2F1/sweep");
        let r = s.sweep_request().unwrap();
        assert_eq!((r.layer, r.neuron, r.target.as_str()), (29, 808, " dog"));
        assert_eq!(r.values, vec![-1.0, 0.0, 1.0]);
        assert_eq!(r.prompt.text, DEFAULT_SWEEP_PROMPT);
        assert_eq!(r.prompt.chat, Some(false));
        assert!(NeuronState { steps: 1, ..s }.sweep_request().is_err());
    }

    #[test]
    fn sweep_values_are_even_and_bounded() {
        assert_eq!(sweep_values(-1.0, 1.0, 5).unwrap(), vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert!(sweep_values(1.0, -1.0, 5).is_err());
        assert!(sweep_values(0.0, 1.0, 1).is_err());
        assert!(sweep_values(0.0, 1.0, limits::MAX_SWEEP_VALUES + 1).is_err());
        assert!(sweep_values(0.0, 2000.0, 5).is_err());
        assert!(sweep_values(f32::NAN, 1.0, 5).is_err());
    }

    #[test]
    fn steer_state_round_trips() {
        let mut s = SteerState {
            model: Some("m".into()),
            prompt: "Tell me, a story & more?".into(),
            seed: 7,
            temp: 0.8,
            top_p: Some(0.9),
            max: 100,
            n: 4,
            chat: false,
            word: "dog".into(),
            ..Default::default()
        };
        s.set_clamps(&[ClampSpec { layer: 29, neuron: 808, value: 12.0 }, ClampSpec { layer: 3, neuron: 4, value: -2.5 }]);
        let href = s.href();
        assert!(href.contains("clamps=29%3A808%3A12%2C3%3A4%3A-2.5"), "{href}");
        let back: SteerState = parse(href.split_once('?').unwrap().1).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.clamp_list().unwrap().len(), 2);
        assert_eq!(SteerState::default().href(), "/steer");
    }

    #[test]
    fn steer_requests_batch_the_samples_and_refuse_bad_settings() {
        let s = SteerState { clamps: "29:808:12".into(), seed: 10, n: 3, temp: 0.7, ..Default::default() };
        let clamps = s.validate().unwrap();
        let r = s.request(clamps);
        assert_eq!((r.sampling.seed, r.samples), (10, 3));
        assert!(r.compare && r.stream);
        assert_eq!(r.prompt.text, DEFAULT_STEER_PROMPT);
        assert_eq!(r.prompt.chat, Some(true));
        for bad in [
            SteerState { clamps: String::new(), ..s.clone() },
            SteerState { clamps: "29:808".into(), ..s.clone() },
            SteerState { clamps: "29:808:5000".into(), ..s.clone() },
            SteerState { clamps: "29:808:NaN".into(), ..s.clone() },
            SteerState { clamps: "29:808:12,0:0:10,29:808:-3".into(), ..s.clone() },
            SteerState { n: 0, ..s.clone() },
            SteerState { n: MAX_SAMPLES + 1, ..s.clone() },
            SteerState { max: 0, ..s.clone() },
            SteerState { temp: -1.0, ..s.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mentions_counts_whole_words() {
        assert!(mentions("I love Dogs!", "dog"));
        assert!(mentions("the dog's bone", "dog"));
        assert!(mentions("Dog.", " dog "));
        assert!(!mentions("a hotdog stand", "dog"));
        assert!(!mentions("dogma", "dog"));
        assert!(!mentions("anything", ""));
    }

    #[test]
    fn compare_and_model_links() {
        let c = CompareState { a: Some("base".into()), b: Some("instruct".into()) };
        assert_eq!(parse::<CompareState>(c.href().split_once('?').unwrap().1).unwrap(), c);
        assert_eq!(c.api_url(30).as_deref(), Some("/api/compare?a=base&b=instruct&top=30"));
        assert_eq!(CompareState { b: None, ..c }.api_url(30), None);
        assert_eq!(SteerState::generate_url("a/b"), "/api/models/a%2Fb/generate");
        assert_eq!(with_model("/", "?q=+dog&model=old", "new"), "/?model=new&q=+dog");
        assert_eq!(with_model("/about", "", "a b"), "/about?model=a+b");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(query_param("?q=+dog&model=a%2Fb", "model").as_deref(), Some("a/b"));
        assert_eq!(query_param("q=x", "model"), None);
    }
}
