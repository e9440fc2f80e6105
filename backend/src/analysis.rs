//! Questions answered with the neuron map: concept search, neuron detail, model comparison.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, IndexOp, Tensor, D};
use rayon::prelude::*;
use shared::{
    ActivationStats, ChangedNeuron, ClassedNeuron, ClassesResponse, CompareResponse, Concept, LayerAgreement, LayerClassCounts, Moments, NeuronClass,
    NeuronDetail, Polarity, Scale, SearchHit, SimilarNeuron, SweepPoint, TokenInfo, TokenScore, VerifiedNeuron, VerifyRequest, VerifyResponse, View,
    ViewClass, ViewTokens,
};

use crate::cancel::Cancel;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::map::{self, NeuronMap, NORM_TOP};
use crate::model::{Cache, Clamp, Intervention, Room};

/// Fixed prompts over which a neuron's natural activation statistics are taken.
pub const STAT_PROMPTS: [&str; 8] = [
    "The capital of France is Paris, a city known for art, food and fashion.",
    "My favourite animal is the dog, but my sister prefers cats and horses.",
    "In 2024 the team released a new version of the software with 365 fixes.",
    "She played the piano while the rain fell softly on the old wooden roof.",
    "To make a pizza, spread tomato sauce on the dough and add cheese.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
];

/// Things derived from a model once and kept, all small (a few floats per neuron): the length
/// of every up row, activation statistics. Directions are never copied: each use reads the
/// weights layer by layer ([`per_layer`]).
#[derive(Default)]
pub struct Derived {
    up_norms: OnceLock<Vec<f32>>,
    acts: OnceLock<Vec<ActivationStats>>,
}

/// `f(layer's directions of view)` for every layer, concatenated along the first axis: one
/// layer's directions (views of the weights, in f32) in memory at a time.
fn per_layer(engine: &Engine, view: View, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let parts = (0..engine.config().n_layers).map(|l| f(&map::directions(&*engine.model, view, l)?)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// Every neuron of every layer in `view` against each row of `u` (`[n, d]`, f32): `[n, N]`,
/// one layer at a time through [`map::project`] (quantized layers multiplied in place).
fn project_all(engine: &Engine, view: View, u: &Tensor) -> Result<Tensor> {
    let parts = (0..engine.config().n_layers).map(|l| map::project(&*engine.model, view, l, u)).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 1)?)
}

/// Result of a concept search, per neuron and polarity.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// Score of every neuron (global index), positive polarity.
    pub pos: Vec<f32>,
    /// Score of every neuron, negative polarity.
    pub neg: Vec<f32>,
    pub top: Vec<SearchHit>,
}

/// The paper's normalised probability p(t) / mean(top-100 p), summed over `tokens`, for every
/// neuron and both polarities: exp(±logit_t − logsumexp(top-100 logits) + ln 100), one
/// matrix–vector product per token (the softmax denominator cancels).
pub fn search(engine: &Engine, map: &NeuronMap, tokens: &[u32], top_n: usize) -> Result<SearchResult> {
    search_polarity(engine, map, tokens, top_n, None)
}

/// [`search`] restricted to one polarity (`Some`): the other polarity's scores are zero, so the
/// ranking, the hits and the per-layer series show only the chosen one.
pub fn search_polarity(engine: &Engine, map: &NeuronMap, tokens: &[u32], top_n: usize, only: Option<Polarity>) -> Result<SearchResult> {
    search_concept(engine, map, tokens, false, top_n, only, Scale::Raw)
}

/// Below this median standard deviation of a map's raw logits (in nats) the paper's softmax is
/// flat: the top 100 tokens of a neuron lie within a few tenths of a nat, so every neuron scores
/// about 1 for every token of its top and the search plot is a band. SmolLM2's maps: 0.43–0.47;
/// Gemma 3 270M's: 0.014–0.035.
pub const FLAT_STD: f32 = 0.1;

/// The scale a search of `map` uses when the request names none: the paper's raw logits, unless
/// they are flat ([`FLAT_STD`]); then [`Scale::Std`].
pub fn default_scale(map: &NeuronMap) -> Scale {
    if map.median_std() < FLAT_STD {
        Scale::Std
    } else {
        Scale::Raw
    }
}

/// Concept search for a phrase of several tokens ("Sherlock Holmes" → " Sherlock", " Holmes"):
/// the *geometric mean* of the tokens' normalised probabilities,
/// exp(mean_i [±logit_i − logsumexp(top-100) + ln 100]).
///
/// Why: a neuron's decoded distribution is a bag of tokens it promotes; a neuron that stands for
/// the phrase must promote every one of its tokens. The sum used for alternatives (" dog, dogs")
/// is a soft OR that one token alone can fill: for "social security" it is topped by neurons of
/// " social" alone, a common word. The geometric mean is a soft AND: it is high only when every
/// token is high, equals the single-token score for a one-token phrase, and keeps the paper's
/// scale (1 = as likely as the neuron's average top-100 token).
pub fn search_phrase(engine: &Engine, map: &NeuronMap, tokens: &[u32], top_n: usize, only: Option<Polarity>) -> Result<SearchResult> {
    search_concept(engine, map, tokens, true, top_n, only, Scale::Raw)
}

/// [`search_polarity`] (`phrase = false`) or [`search_phrase`] (`phrase = true`), with each
/// neuron's logits scaled as `scale` says: [`Scale::Std`] multiplies neuron i's logits by
/// [`NeuronMap::inv_std`] before the softmax, so its score is
/// exp(s_i·(±logit_t) − logsumexp(s_i · top-100 logits) + ln 100) ([`NeuronMap::lse_top_std`]).
pub fn search_concept(
    engine: &Engine,
    map: &NeuronMap,
    tokens: &[u32],
    phrase: bool,
    top_n: usize,
    only: Option<Polarity>,
    scale: Scale,
) -> Result<SearchResult> {
    if tokens.is_empty() {
        return Err(Error::bad("a concept needs at least one token"));
    }
    // The tokens' unembedding rows ([T, d]) against every neuron: one row of logits per token
    // (not one small row per neuron: 458,752 of them for Llama 3.1 8B), the neurons scored in
    // parallel.
    let u = fold_final_norm(engine, &engine.model.lm_head().rows(tokens)?.to_dtype(DType::F32)?, map.meta.final_norm)?;
    let logits: Vec<Vec<f32>> = project_all(engine, map.meta.view, &u)?.to_vec2()?; // [T, N]
    let ln_top = (NORM_TOP as f32).ln();
    let n = map.n_neurons();
    let (mut pos, mut neg) = (vec![0f32; n], vec![0f32; n]);
    let inv = 1.0 / tokens.len() as f32;
    let std_top = (scale == Scale::Std).then(|| map.lse_top_std());
    pos.par_iter_mut().zip(neg.par_iter_mut()).enumerate().for_each(|(i, (pos, neg))| {
        let (s, lse_pos, lse_neg) = match std_top {
            Some([p, n]) => (map.inv_std(i), p[i], n[i]),
            None => (1.0, map.pos.lse_top[i], map.neg.lse_top[i]),
        };
        let (bp, bn) = (ln_top - lse_pos, ln_top - lse_neg);
        let col = || logits.iter().map(|row| row[i]);
        if phrase {
            *pos = (col().map(|l| s * l + bp).sum::<f32>() * inv).exp();
            *neg = (col().map(|l| -s * l + bn).sum::<f32>() * inv).exp();
        } else {
            *pos = col().map(|l| (s * l + bp).exp()).sum();
            *neg = col().map(|l| (-s * l + bn).exp()).sum();
        }
    });
    match only {
        Some(Polarity::Pos) => neg.fill(0.0),
        Some(Polarity::Neg) => pos.fill(0.0),
        None => {}
    }
    let best: Vec<f32> = pos.iter().zip(&neg).map(|(a, b)| a.max(*b)).collect();
    let top = crate::engine::top_indices(&best, top_n)
        .into_iter()
        .map(|i| {
            let polarity = if pos[i] >= neg[i] && only != Some(Polarity::Neg) { Polarity::Pos } else { Polarity::Neg };
            let (layer, neuron) = (i / map.meta.d_ff, i % map.meta.d_ff);
            let (ids, _) = map.top(polarity, layer, neuron);
            SearchHit { layer, neuron, polarity, score: best[i], top_tokens: ids.iter().take(8).map(|&t| engine.tok.token_text(t)).collect() }
        })
        .collect();
    Ok(SearchResult { pos, neg, top })
}

impl SearchResult {
    /// Per-layer series for plots: |x| is the better polarity's score, negative when it is `neg`.
    pub fn signed_layers(&self, d_ff: usize) -> Vec<Vec<f32>> {
        self.pos.chunks(d_ff).zip(self.neg.chunks(d_ff)).map(|(p, q)| p.iter().zip(q).map(|(&a, &b)| if a >= b { a } else { -b }).collect()).collect()
    }
}

/// The logits of directions `dirs` (`[c, d]`, f32, on the model's device) through the
/// unembedding, `[c][vocab]`, with the final norm's weight folded into the directions when
/// asked (W_U diag(g) w = W_U (g ⊙ w)). The product runs on the model's device, with a dense
/// head converted to f32 there (a head held as quantized blocks multiplies them in place): the
/// unembedding never goes to the host and back (2 GB of f32 for Llama 3.1 8B), only the `c`
/// rows of logits come back.
fn head_logits(engine: &Engine, dirs: &Tensor, final_norm: bool) -> Result<Vec<Vec<f32>>> {
    Ok(engine.model.lm_head().forward_f32(&fold_final_norm(engine, dirs, final_norm)?)?.to_vec2()?)
}

/// Rows `x` (`[r, d]`, f32) times the final norm's weight when it is folded in: what search
/// and detail multiply with the head, so that no request folds it into W_U itself.
fn fold_final_norm(engine: &Engine, x: &Tensor, final_norm: bool) -> Result<Tensor> {
    Ok(match final_norm {
        true => x.broadcast_mul(&engine.model.final_norm_weight().to_dtype(DType::F32)?.unsqueeze(0)?)?,
        false => x.clone(),
    })
}

/// Tokens of one decoded direction (its `logits` through the unembedding), top `n` of a
/// polarity, with their probabilities and their normalised probabilities after `scale`.
fn decode(engine: &Engine, logits: &[f32], polarity: Polarity, n: usize, scale: Scale) -> Result<Vec<TokenScore>> {
    let sign = polarity.sign();
    let logits: Vec<f32> = logits.iter().map(|&l| l * sign).collect();
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
    let lse = m + z.ln() as f32;
    let top = crate::engine::top_indices(&logits, NORM_TOP.max(n));
    // The factor on the logits before the normalised probability's softmax.
    let s = match scale {
        Scale::Raw => 1.0,
        Scale::Std => {
            let mean = logits.iter().map(|&l| l as f64).sum::<f64>() / logits.len() as f64;
            let var = logits.iter().map(|&l| (l as f64 - mean).powi(2)).sum::<f64>() / logits.len() as f64;
            if var > 0.0 {
                (1.0 / var.sqrt()) as f32
            } else {
                1.0
            }
        }
    };
    let lse_top = s * m + (top.iter().take(NORM_TOP).map(|&i| ((s * (logits[i] - m)) as f64).exp()).sum::<f64>()).ln() as f32;
    let ln_top = (NORM_TOP as f32).ln();
    Ok(top
        .into_iter()
        .take(n)
        .map(|i| TokenScore {
            id: i as u32,
            text: engine.tok.token_text(i as u32),
            prob: (logits[i] - lse).exp(),
            norm: (s * logits[i] - lse_top + ln_top).exp(),
        })
        .collect())
}

/// Natural activation statistics of every neuron over [`STAT_PROMPTS`] (computed once).
pub fn activation_stats(engine: &Engine) -> Result<&[ActivationStats]> {
    if let Some(s) = engine.derived.acts.get() {
        return Ok(s);
    }
    let cfg = engine.config();
    let n = cfg.n_layers * cfg.d_ff;
    let (mut sum, mut sq, mut mn, mut mx, mut count) = (vec![0f64; n], vec![0f64; n], vec![f32::INFINITY; n], vec![f32::NEG_INFINITY; n], 0usize);
    let layers: Vec<usize> = (0..cfg.n_layers).collect();
    for p in STAT_PROMPTS {
        let ids = engine.tok.encode_prompt(p)?;
        let x = Tensor::new(ids.as_slice(), engine.model.device())?.unsqueeze(0)?;
        let out = engine.model.forward(&x, &mut Cache::new(cfg).with_room(Room::Scratch), &[Intervention::none()], &layers)?;
        for (l, acts) in out.mlp_acts {
            let rows: Vec<Vec<f32>> = acts.i(0)?.to_vec2()?;
            for row in &rows {
                for (j, &v) in row.iter().enumerate() {
                    let i = l * cfg.d_ff + j;
                    sum[i] += v as f64;
                    sq[i] += (v as f64) * (v as f64);
                    mn[i] = mn[i].min(v);
                    mx[i] = mx[i].max(v);
                }
            }
        }
        count += ids.len();
    }
    let stats = (0..n)
        .map(|i| {
            let mean = sum[i] / count as f64;
            ActivationStats {
                mean: mean as f32,
                std: (sq[i] / count as f64 - mean * mean).max(0.0).sqrt() as f32,
                min: mn[i],
                max: mx[i],
                positions: count,
            }
        })
        .collect();
    Ok(engine.derived.acts.get_or_init(|| stats))
}

/// The length of every up row, `[N]` (at least 1e-12).
fn up_norms(engine: &Engine) -> Result<&[f32]> {
    if let Some(t) = engine.derived.up_norms.get() {
        return Ok(t);
    }
    let norms: Vec<f32> = per_layer(engine, View::Up, |up| Ok(up.sqr()?.sum(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?))?.to_vec1()?;
    Ok(engine.derived.up_norms.get_or_init(|| norms))
}

/// Everything about one neuron: top and bottom tokens of each view, natural activation
/// statistics, and the most similar neurons (cosine of up rows, all layers).
/// Each token's `norm` is the normalised probability after `scale` (for [`Scale::Std`], each
/// view's logits divided by their standard deviation, as a search scales them); `prob` is the
/// softmax of the logits as they are.
pub fn neuron_detail(engine: &Engine, layer: usize, neuron: usize, final_norm: bool, n_tokens: usize, scale: Scale) -> Result<NeuronDetail> {
    crate::limits::check_layer_neuron(layer, neuron, engine.config())?;
    // The neuron's direction in each view, [3, d], decoded in one product on the device.
    let rows = View::ALL.iter().map(|&view| map::direction(&*engine.model, view, layer, neuron)).collect::<Result<Vec<_>>>()?;
    let logits = head_logits(engine, &Tensor::stack(&rows, 0)?, final_norm)?;
    let mut views = Vec::new();
    for (&view, logits) in View::ALL.iter().zip(&logits) {
        for polarity in [Polarity::Pos, Polarity::Neg] {
            views.push(ViewTokens { view, polarity, tokens: decode(engine, logits, polarity, n_tokens, scale)? });
        }
    }
    let i = layer * engine.config().d_ff + neuron;
    let activation = activation_stats(engine)?[i];
    let norms = up_norms(engine)?;
    let up = View::ALL.iter().position(|&v| v == View::Up).expect("the up view");
    let this = (&rows[up] / norms[i] as f64)?.unsqueeze(0)?;
    let dots: Vec<f32> = project_all(engine, View::Up, &this)?.squeeze(0)?.to_vec1()?;
    let cos: Vec<f32> = dots.iter().zip(norms).map(|(d, n)| d / n).collect();
    let abs: Vec<f32> = cos.iter().enumerate().map(|(j, c)| if j == i { -1.0 } else { c.abs() }).collect();
    let d_ff = engine.config().d_ff;
    let similar =
        crate::engine::top_indices(&abs, 10).into_iter().map(|j| SimilarNeuron { layer: j / d_ff, neuron: j % d_ff, cosine: cos[j] }).collect();
    let classes = View::ALL
        .iter()
        .filter_map(|&view| engine.map_if_ready(view, final_norm))
        .map(|m| {
            let moments = moments(&m, i);
            ViewClass { view: m.meta.view, class: NeuronClass::of(&moments, m.median_std()), moments }
        })
        .collect();
    Ok(NeuronDetail { layer, neuron, final_norm, views, activation, similar, classes, scale })
}

/// Base vs instruct: per layer, the share of neurons whose top token (up view, positive
/// polarity) is the same in both models, and the neurons whose up rows changed most.
pub fn compare_models(a: &Engine, b: &Engine, map_a: &NeuronMap, map_b: &NeuronMap, top_n: usize) -> Result<CompareResponse> {
    let (ca, cb) = (a.config(), b.config());
    if (ca.n_layers, ca.d_ff, ca.d_model, ca.vocab_size) != (cb.n_layers, cb.d_ff, cb.d_model, cb.vocab_size) {
        return Err(Error::bad(format!(
            "models differ in shape: {} layers x {} neurons (d {}, vocab {}) vs {} x {} (d {}, vocab {})",
            ca.n_layers, ca.d_ff, ca.d_model, ca.vocab_size, cb.n_layers, cb.d_ff, cb.d_model, cb.vocab_size
        )));
    }
    let (ka, kb) = (map_a.meta.k, map_b.meta.k);
    let mut layers = Vec::with_capacity(ca.n_layers);
    let mut total_same = 0;
    for l in 0..ca.n_layers {
        let same = (0..ca.d_ff)
            .filter(|&n| {
                let i = l * ca.d_ff + n;
                map_a.pos.ids[i * ka] == map_b.pos.ids[i * kb]
            })
            .count();
        total_same += same;
        layers.push(LayerAgreement { layer: l, same_top: same, neurons: ca.d_ff, share: same as f32 / ca.d_ff as f32 });
    }
    let (na, nb) = (up_norms(a)?, up_norms(b)?);
    let mut dots = Vec::with_capacity(na.len());
    for l in 0..ca.n_layers {
        let (ua, ub) = (map::directions(&*a.model, View::Up, l)?, map::directions(&*b.model, View::Up, l)?);
        dots.extend((ua * ub)?.sum(D::Minus1)?.to_vec1::<f32>()?);
    }
    let cos: Vec<f32> = dots.iter().zip(na.iter().zip(nb)).map(|(d, (x, y))| d / (x * y)).collect();
    let neg: Vec<f32> = cos.iter().map(|c| -c).collect();
    let changed = crate::engine::top_indices(&neg, top_n)
        .into_iter()
        .map(|i| ChangedNeuron {
            layer: i / ca.d_ff,
            neuron: i % ca.d_ff,
            cosine: cos[i],
            top_a: a.tok.token_text(map_a.pos.ids[i * ka]),
            top_b: b.tok.token_text(map_b.pos.ids[i * kb]),
        })
        .collect();
    Ok(CompareResponse {
        model_a: a.info.name.clone(),
        model_b: b.info.name.clone(),
        layers,
        overall_share: total_same as f32 / (ca.n_layers * ca.d_ff) as f32,
        changed,
    })
}

/// The moments of neuron `i` of `map` as the shared type.
pub fn moments(map: &NeuronMap, i: usize) -> Moments {
    let m = &map.moments;
    Moments { mean: m.mean[i], std: m.std[i], skew: m.skew[i], kurtosis: m.kurtosis[i] }
}

/// The class of every neuron of `map` (see [`NeuronClass::of`]).
pub fn classify(map: &NeuronMap) -> Vec<NeuronClass> {
    let med = map.median_std();
    (0..map.n_neurons()).map(|i| NeuronClass::of(&moments(map, i), med)).collect()
}

/// Per-layer counts of every class, and the `top` strongest neurons of `class`: by kurtosis for
/// prediction and suppression neurons, by std for partition and other neurons.
pub fn classes(engine: &Engine, map: &NeuronMap, class: NeuronClass, top: usize) -> Result<ClassesResponse> {
    let classes = classify(map);
    let d_ff = map.meta.d_ff;
    let layers = classes
        .chunks(d_ff)
        .enumerate()
        .map(|(layer, c)| LayerClassCounts {
            layer,
            prediction: c.iter().filter(|&&x| x == NeuronClass::Prediction).count(),
            suppression: c.iter().filter(|&&x| x == NeuronClass::Suppression).count(),
            partition: c.iter().filter(|&&x| x == NeuronClass::Partition).count(),
            neurons: c.len(),
        })
        .collect();
    let key = |i: usize| match class {
        NeuronClass::Prediction | NeuronClass::Suppression => map.moments.kurtosis[i],
        NeuronClass::Partition | NeuronClass::Other => map.moments.std[i],
    };
    let strength: Vec<f32> = (0..classes.len()).map(|i| if classes[i] == class { key(i) } else { f32::NEG_INFINITY }).collect();
    let polarity = if class == NeuronClass::Suppression { Polarity::Neg } else { Polarity::Pos };
    let neurons = crate::engine::top_indices(&strength, top)
        .into_iter()
        .filter(|&i| classes[i] == class)
        .map(|i| {
            let (layer, neuron) = (i / d_ff, i % d_ff);
            let (ids, _) = map.top(polarity, layer, neuron);
            ClassedNeuron { layer, neuron, moments: moments(map, i), top_tokens: ids.iter().take(8).map(|&t| engine.tok.token_text(t)).collect() }
        })
        .collect();
    Ok(ClassesResponse {
        view: map.meta.view,
        final_norm: map.meta.final_norm,
        kurtosis_threshold: NeuronClass::KURTOSIS,
        partition_std: NeuronClass::PARTITION_STD,
        median_std: map.median_std(),
        layers,
        class,
        neurons,
    })
}

/// A concept's token ids, and whether they are one phrase (else alternatives).
#[derive(Debug, Clone, PartialEq)]
pub struct ConceptIds {
    pub ids: Vec<u32>,
    pub phrase: bool,
}

impl ConceptIds {
    /// Positions scored: a phrase's tokens one after the other, or one for alternatives.
    pub fn steps(&self) -> usize {
        if self.phrase {
            self.ids.len()
        } else {
            1
        }
    }

    /// Resolve a [`Concept`]: alternatives must each be one token; a phrase is tokenized as written.
    pub fn resolve(engine: &Engine, c: &Concept) -> Result<Self> {
        match c {
            Concept::Tokens(words) => {
                if words.is_empty() || words.len() > 16 {
                    return Err(Error::bad("give 1 to 16 tokens"));
                }
                // Each alternative once: a repeated one would count its probability twice.
                let mut ids: Vec<u32> = Vec::with_capacity(words.len());
                for w in words {
                    let id = engine.tok.single_token(w)?;
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                Ok(Self { ids, phrase: false })
            }
            Concept::Phrase(text) => Ok(Self { ids: phrase_tokens(engine, text)?, phrase: true }),
        }
    }
}

/// The tokens of a phrase concept, checked: 1 to [`limits::MAX_PHRASE_TOKENS`].
pub fn phrase_tokens(engine: &Engine, text: &str) -> Result<Vec<u32>> {
    if text.trim().is_empty() {
        return Err(Error::bad("the phrase is empty"));
    }
    if text.len() > 256 {
        return Err(Error::TooLarge("a phrase is limited to 256 bytes".into()));
    }
    let ids = engine.tok.encode_raw(text)?;
    if ids.is_empty() || ids.len() > shared::limits::MAX_PHRASE_TOKENS {
        return Err(Error::bad(format!("{text:?} is {} tokens; a phrase may have 1 to {}", ids.len(), shared::limits::MAX_PHRASE_TOKENS)));
    }
    Ok(ids)
}

/// A verification request checked and resolved (cheap: tokenization only).
pub struct VerifyPlan {
    pub concept: ConceptIds,
    pub prompts: Vec<Vec<u32>>,
    pub candidates: usize,
    pub values: usize,
    pub range: f32,
}

impl VerifyPlan {
    pub fn new(engine: &Engine, req: &VerifyRequest) -> Result<Self> {
        use shared::limits::{MAX_VERIFY_CANDIDATES, MAX_VERIFY_PROMPTS, MAX_VERIFY_VALUES};
        let concept = ConceptIds::resolve(engine, &req.concept)?;
        if req.prompts.is_empty() || req.prompts.len() > MAX_VERIFY_PROMPTS {
            return Err(Error::bad(format!("give 1 to {MAX_VERIFY_PROMPTS} prompts")));
        }
        if req.candidates == 0 || req.candidates > MAX_VERIFY_CANDIDATES {
            return Err(Error::bad(format!("candidates must be between 1 and {MAX_VERIFY_CANDIDATES}")));
        }
        if req.values < 2 || req.values > MAX_VERIFY_VALUES {
            return Err(Error::bad(format!("values must be between 2 and {MAX_VERIFY_VALUES}")));
        }
        if !(req.range.is_finite() && req.range > 0.0 && req.range <= 100.0) {
            return Err(Error::bad("range must be a number above 0 and at most 100"));
        }
        let prompts = req.prompts.iter().map(|p| engine.prompt_ids(p)).collect::<Result<Vec<_>>>()?;
        let plan = Self { concept, prompts, candidates: req.candidates, values: req.values, range: req.range };
        let context = engine.config().max_seq_len;
        for p in &plan.prompts {
            crate::limits::check_prompt_tokens(p.len(), 0, context)?;
            if p.len() + plan.concept.steps() > context {
                return Err(Error::TooLarge(format!(
                    "a prompt of {} tokens and the phrase's {} exceed the model's context of {context} tokens",
                    p.len(),
                    plan.concept.steps()
                )));
            }
        }
        Ok(plan)
    }

    /// Estimated work, as if every row split from the others at layer 0 (an upper bound: the
    /// candidates are only known once the maps are searched).
    pub fn cost(&self, engine: &Engine) -> f64 {
        let rows = 1 + self.candidates * self.values;
        self.prompts.iter().map(|p| engine.concept_cost(p.len(), self.concept.steps(), rows, 0)).sum()
    }
}

/// The map's candidates for a concept: the top of every view and both polarities, pooled by
/// score, one entry per neuron (its best view). Every view is scored on one scale, so that their
/// scores compare: [`Scale::Std`] when any of the maps is flat ([`default_scale`]).
pub fn candidates(engine: &Engine, maps: &[Arc<NeuronMap>], concept: &ConceptIds, n: usize) -> Result<Vec<(View, SearchHit)>> {
    let scale = pool_scale(maps);
    let mut pool = Vec::new();
    for map in maps {
        let r = search_concept(engine, map, &concept.ids, concept.phrase, n, None, scale)?;
        pool.extend(r.top.into_iter().map(|h| (map.meta.view, h)));
    }
    pool.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
    let mut seen = std::collections::HashSet::new();
    pool.retain(|(_, h)| seen.insert((h.layer, h.neuron)));
    pool.truncate(n);
    Ok(pool)
}

/// The one scale [`candidates`] scores every view of `maps` on: [`Scale::Std`] when any of them
/// is flat ([`default_scale`]), else the paper's.
pub fn pool_scale(maps: &[Arc<NeuronMap>]) -> Scale {
    if maps.iter().any(|m| default_scale(m) == Scale::Std) {
        Scale::Std
    } else {
        Scale::Raw
    }
}

/// Causal verification: clamp each of the map's candidates over a range scaled to its natural
/// activation, measure log p(concept) after every prompt, and rank the candidates by the largest
/// rise (mean over prompts). All candidates × values of one prompt run as one batch (split at
/// the first clamped layer, in memory-bounded chunks).
pub fn verify(engine: &Engine, maps: &[Arc<NeuronMap>], plan: &VerifyPlan, cancel: &Cancel) -> Result<VerifyResponse> {
    let cands = candidates(engine, maps, &plan.concept, plan.candidates)?;
    let stats = activation_stats(engine)?;
    let d_ff = engine.config().d_ff;
    let mut rows = vec![Intervention::none()];
    let mut values = Vec::with_capacity(cands.len());
    for (_, h) in &cands {
        let s = stats[h.layer * d_ff + h.neuron];
        let top = (plan.range * s.min.abs().max(s.max.abs()).max(1e-3)).min(shared::limits::MAX_CLAMP_ABS);
        let vs = shared::linspace(-top, top, plan.values);
        rows.extend(vs.iter().map(|&value| Intervention { clamps: vec![Clamp { layer: h.layer, neuron: h.neuron, value }] }));
        values.push(vs);
    }
    // lp[prompt][row]
    let lp = plan.prompts.iter().map(|ids| engine.concept_logprobs(ids, &plan.concept, &rows, cancel)).collect::<Result<Vec<_>>>()?;
    if lp.iter().any(|l| !l[0].is_finite()) {
        return Err(Error::NonFinite("the unclamped model's output is not a finite number for this prompt".into()));
    }
    let np = lp.len() as f64;
    let mean_p = |row: usize| (lp.iter().map(|l| l[row].exp()).sum::<f64>() / np) as f32;
    let effect = |row: usize| (lp.iter().map(|l| l[row] - l[0]).sum::<f64>() / np) as f32;
    let mut neurons: Vec<VerifiedNeuron> = cands
        .iter()
        .enumerate()
        .filter_map(|(c, (view, h))| {
            let first = 1 + c * plan.values;
            let curve: Vec<SweepPoint> = values[c].iter().enumerate().map(|(j, &value)| SweepPoint { value, prob: mean_p(first + j) }).collect();
            // The largest finite effect (a value whose output overflowed has none); among equal
            // effects the gentlest clamp. A candidate with no finite effect at all is left out.
            let best = (0..plan.values)
                .filter(|&j| effect(first + j).is_finite())
                .max_by(|&a, &b| effect(first + a).total_cmp(&effect(first + b)).then(values[c][b].abs().total_cmp(&values[c][a].abs())))?;
            Some(VerifiedNeuron {
                layer: h.layer,
                neuron: h.neuron,
                view: *view,
                polarity: h.polarity,
                map_score: h.score,
                map_rank: c,
                best_value: values[c][best],
                effect: effect(first + best),
                best_prob: mean_p(first + best),
                curve,
            })
        })
        .collect();
    neurons.sort_by(|a, b| b.effect.total_cmp(&a.effect).then(a.map_rank.cmp(&b.map_rank)));
    Ok(VerifyResponse {
        tokens: plan.concept.ids.iter().map(|&id| TokenInfo { id, text: engine.tok.token_text(id) }).collect(),
        phrase: plan.concept.phrase,
        baseline: mean_p(0),
        neurons,
        scale: pool_scale(maps),
    })
}
