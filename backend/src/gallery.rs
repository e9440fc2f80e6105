//! The home page's gallery: curated examples (concept → neuron → clamp → prompt) with the effect
//! each one measurably has. The examples live in `assets/gallery.json`, compiled in, keyed by the
//! model's content fingerprint and weight mode, so a server shows only the examples verified on
//! exactly the weights it runs. [`measure`] reruns an example with the product's own sweep and
//! steered samples (the same requests the steer page sends for the example's link); [`check`]
//! says whether it still works and still matches its stored figures. `flash-interp gallery`
//! prints both and `--write` stores fresh figures; a test runs the check on the default model.

use serde::{Deserialize, Serialize};
use shared::{mentions, GalleryExample, GalleryMeasured};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::Cancel;

/// The stored gallery, as compiled in.
pub const STORED: &str = include_str!("../assets/gallery.json");

/// Where the stored gallery lives in the repository (what `--write` updates by default).
pub fn stored_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("gallery.json")
}

/// The gallery file: examples per model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gallery {
    pub models: Vec<ModelGallery>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelGallery {
    /// For people reading the file.
    pub model: String,
    /// `Engine::fingerprint` of the model file.
    pub fingerprint: String,
    /// `Engine::weights_desc`: the figures hold for these weights only.
    pub weights: String,
    pub examples: Vec<GalleryExample>,
}

impl Gallery {
    pub fn parse(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::bad(format!("gallery file: {e}")))
    }

    /// The compiled-in gallery, parsed once.
    pub fn stored() -> &'static Self {
        static PARSED: std::sync::LazyLock<Gallery> =
            std::sync::LazyLock::new(|| Gallery::parse(STORED).expect("the compiled-in gallery parses (a unit test checks it)"));
        &PARSED
    }

    /// The examples for `engine`'s weights; empty for a model without any.
    pub fn for_engine(&self, engine: &Engine) -> Result<Vec<GalleryExample>> {
        let (fp, weights) = (engine.fingerprint()?, engine.weights_desc());
        Ok(self.models.iter().filter(|m| m.fingerprint == fp && m.weights == weights).flat_map(|m| m.examples.clone()).collect())
    }

    /// The entry for `engine`, created when missing (for `--write`).
    pub fn entry_mut(&mut self, engine: &Engine) -> Result<&mut ModelGallery> {
        let (fp, weights) = (engine.fingerprint()?.to_owned(), engine.weights_desc());
        let i = match self.models.iter().position(|m| m.fingerprint == fp && m.weights == weights) {
            Some(i) => i,
            None => {
                self.models.push(ModelGallery { model: engine.info.name.clone(), fingerprint: fp, weights, examples: Vec::new() });
                self.models.len() - 1
            }
        };
        Ok(&mut self.models[i])
    }
}

/// Rerun `ex` on `engine`: its sweep, then its normal/steered samples (one batch).
/// `progress(done, total)` counts the normal answers' tokens.
pub fn measure(engine: &Engine, ex: &GalleryExample, cancel: &Cancel, progress: &mut dyn FnMut(usize, usize)) -> Result<GalleryMeasured> {
    let sweep = engine.sweep_request(&ex.sweep_request(), cancel)?;
    let p_clamped = sweep.points.first().map(|p| p.prob).ok_or_else(|| Error::bad("the sweep gave no point"))?;
    let mut m = GalleryMeasured {
        p_normal: sweep.baseline,
        p_clamped,
        normal_mentions: 0,
        steered_mentions: 0,
        normal_answer: String::new(),
        steered_answer: String::new(),
    };
    // Every sample at once, one batch; progress counts the tokens of the normal answers.
    let mut req = ex.generate_request();
    req.stream = false;
    let total = ex.samples * ex.max_tokens;
    let mut done = 0;
    progress(0, total);
    let r = engine.generate_request(&req, cancel, &mut |_, v, _, steps| {
        if v == shared::Variant::Normal {
            done += steps.len();
            progress(done.min(total), total);
        }
        true
    })?;
    if r.completions.len() != 2 * ex.samples {
        return Err(Error::bad("a comparison gives two answers per sample"));
    }
    for c in &r.completions {
        let (count, answer) = match c.variant {
            shared::Variant::Normal => (&mut m.normal_mentions, &mut m.normal_answer),
            shared::Variant::Steered => (&mut m.steered_mentions, &mut m.steered_answer),
        };
        *count += mentions(&c.text, &ex.word) as usize;
        if c.sample == 0 {
            *answer = c.text.clone();
        }
    }
    progress(total, total);
    Ok(m)
}

/// How far fresh figures may sit from the stored ones: probabilities within 10% (plus 1e-4),
/// mention counts within one sample (another CPU's rounding can flip one sampled token).
pub const P_TOLERANCE: f32 = 0.10;

/// Whether an example works, judged on fresh figures: the clamp raises p(target) at least
/// threefold and by 0.02, and the steered answers mention the word in at least a quarter more of
/// the samples than the normal ones. With `stored`, also that the fresh figures match them.
pub fn check(ex: &GalleryExample, fresh: &GalleryMeasured, stored: Option<&GalleryMeasured>) -> std::result::Result<(), String> {
    let mut problems = Vec::new();
    if !(fresh.p_clamped >= 3.0 * fresh.p_normal && fresh.p_clamped - fresh.p_normal >= 0.02) {
        problems.push(format!("the clamp no longer raises p({:?}) enough: {:.4} → {:.4}", ex.target, fresh.p_normal, fresh.p_clamped));
    }
    if fresh.steered_mentions < fresh.normal_mentions + ex.samples.div_ceil(4) {
        problems.push(format!(
            "\"{}\" is in {} of {} steered answers and {} normal ones: not enough more",
            ex.word, fresh.steered_mentions, ex.samples, fresh.normal_mentions
        ));
    }
    if let Some(s) = stored {
        let close = |a: f32, b: f32| (a - b).abs() <= P_TOLERANCE * b.abs() + 1e-4;
        if !close(fresh.p_normal, s.p_normal) || !close(fresh.p_clamped, s.p_clamped) {
            problems
                .push(format!("p({:?}) is {:.4} → {:.4}, stored {:.4} → {:.4}", ex.target, fresh.p_normal, fresh.p_clamped, s.p_normal, s.p_clamped));
        }
        if fresh.normal_mentions.abs_diff(s.normal_mentions) > 1 || fresh.steered_mentions.abs_diff(s.steered_mentions) > 1 {
            problems.push(format!(
                "mentions are {} normal / {} steered, stored {} / {}",
                fresh.normal_mentions, fresh.steered_mentions, s.normal_mentions, s.steered_mentions
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_gallery_parses_and_every_example_is_measured_and_works_on_paper() {
        let g = Gallery::stored();
        assert!(!g.models.is_empty());
        for m in &g.models {
            assert!(m.examples.len() >= 3, "{}: a gallery of {} examples", m.model, m.examples.len());
            for ex in &m.examples {
                let stored = ex.measured.as_ref().unwrap_or_else(|| panic!("{}: not measured; run `flash-interp gallery --write`", ex.title));
                check(ex, stored, None).unwrap_or_else(|e| panic!("{}: {e}", ex.title));
            }
        }
    }

    fn example() -> GalleryExample {
        serde_json::from_value(serde_json::json!({
            "title": "t", "note": "n", "concept": " dog", "view": "down", "layer": 1, "neuron": 2, "clamp": 10.0,
            "prompt": "p", "chat": true, "target": " dog", "word": "dog", "temperature": 0.8, "max_tokens": 40, "samples": 8, "seed": 0
        }))
        .unwrap()
    }

    fn fig(p0: f32, p1: f32, n: usize, s: usize) -> GalleryMeasured {
        GalleryMeasured {
            p_normal: p0,
            p_clamped: p1,
            normal_mentions: n,
            steered_mentions: s,
            normal_answer: String::new(),
            steered_answer: String::new(),
        }
    }

    #[test]
    fn check_judges_effect_and_drift() {
        let ex = example();
        assert!(check(&ex, &fig(0.01, 0.3, 0, 6), None).is_ok());
        assert!(check(&ex, &fig(0.01, 0.025, 0, 6), None).is_err(), "2.5× is not enough");
        assert!(check(&ex, &fig(0.2, 0.21, 0, 6), None).is_err(), "a small rise of a large p is not enough");
        assert!(check(&ex, &fig(0.01, 0.3, 3, 4), None).is_err(), "one more mention in 8 is not enough");
        assert!(check(&ex, &fig(0.01, 0.3, 0, 6), Some(&fig(0.0102, 0.29, 1, 7))).is_ok());
        assert!(check(&ex, &fig(0.01, 0.3, 0, 6), Some(&fig(0.01, 0.4, 0, 6))).is_err(), "p drifted");
        assert!(check(&ex, &fig(0.01, 0.3, 0, 6), Some(&fig(0.01, 0.3, 0, 8))).is_err(), "mentions drifted");
    }
}
