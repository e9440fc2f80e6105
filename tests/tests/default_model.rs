//! The real default model must behave: answer the capital of France, tokenize like llama.cpp,
//! and respond to clamps.

use std::sync::OnceLock;

use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::model::{Intervention, WeightMode};
use flash_interp::Cancel;
use flash_interp_e2e::{default_model, fixture};
use shared::{PromptSpec, SamplingParams};

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let mut e = Engine::load(&default_model(), &LoadOptions::default()).expect("load default model");
        // A private cache, emptied first, so the test builds the map rather than trusting an
        // earlier run's; it lives under target/ at a fixed path, so runs do not pile up copies.
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("default-model-map-cache");
        let _ = std::fs::remove_dir_all(&dir);
        e.cache_dir = dir;
        e
    })
}

fn plain(text: &str) -> PromptSpec {
    PromptSpec { text: text.into(), chat: Some(false), messages: None }
}

#[test]
fn model_file_is_the_pinned_one_with_the_expected_shape() {
    let fx = fixture("smollm2-tokenizer.json");
    let sha = flash_interp::fetch::sha256_file(&default_model()).unwrap();
    assert_eq!(sha, fx["model_file"]["gguf_sha256"].as_str().unwrap());
    let c = engine().config();
    let d = &fx["dims"];
    assert_eq!(c.n_layers as u64, d["n_layers"].as_u64().unwrap());
    assert_eq!(c.d_model as u64, d["d_model"].as_u64().unwrap());
    assert_eq!(c.d_ff as u64, d["d_ff"].as_u64().unwrap());
    assert_eq!(c.n_heads as u64, d["n_heads"].as_u64().unwrap());
    assert_eq!(c.n_kv_heads as u64, d["n_kv_heads"].as_u64().unwrap());
    assert_eq!(c.vocab_size as u64, d["vocab_size"].as_u64().unwrap());
    assert!(c.tied_embeddings, "SmolLM2's LM head is tied to the embedding");
}

#[test]
fn tokenizer_matches_known_ids() {
    let fx = fixture("smollm2-tokenizer.json");
    let tok = &engine().tok;
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    for (text, want) in fx["encode"].as_object().unwrap() {
        let got = tok.encode_raw(text).unwrap();
        assert_eq!(got, ids(want), "{text:?}");
        assert_eq!(tok.decode(&got).unwrap(), *text);
    }
    for (text, want) in fx["single_tokens"].as_object().unwrap() {
        assert_eq!(tok.single_token(text).unwrap(), ids(want)[0], "{text:?}");
    }
    // Every token reads as a text that names it alone: pieces of a character (byte-level
    // pieces such as "âĢ", the bytes E2 80 that begin "…" and "’") show their bytes, not "�"
    // (one token is the character "�" itself).
    let mut bytes = 0;
    for id in 0..tok.vocab_size() as u32 {
        let text = tok.token_text(id);
        assert_eq!(tok.single_token(&text).unwrap(), id, "token {id} reads {text:?}");
        bytes += text.contains("\\x") as usize;
    }
    assert!(bytes > 100, "{bytes} tokens are pieces of a character");
    // A text split inside its characters: the pieces' bytes, put back together, are the text's.
    let rare = "🦀 at 東京";
    let pieces: Vec<String> = tok.encode_raw(rare).unwrap().iter().map(|&i| tok.token_text(i)).collect();
    assert!(pieces.iter().any(|p| p.contains("\\x")), "{pieces:?}");
    assert_eq!(flash_interp::tokenizer::unescape_bytes(&pieces.concat()).unwrap(), rare.as_bytes(), "{pieces:?}");
    // The chat template from the GGUF metadata renders the exact prompt, and it tokenizes to the
    // known ids (special tokens matched whole).
    let chat = &fx["chat_prompt"];
    let spec = PromptSpec { text: chat["user"].as_str().unwrap().into(), chat: None, messages: None };
    let rendered =
        engine().chat.as_ref().unwrap().render(&[flash_interp::chat::Message { role: "user".into(), content: spec.text.clone() }]).unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    assert_eq!(engine().prompt_ids(&spec).unwrap(), ids(&chat["ids"]));
}

#[test]
fn paris_is_the_most_likely_next_token() {
    let e = engine();
    let ids = e.prompt_ids(&plain("The capital of France is")).unwrap();
    let top = e.next_token(&ids, &Intervention::none(), 5, &Cancel::default()).unwrap();
    assert_eq!(top[0].text, " Paris", "top tokens: {top:?}");
    assert!(top[0].prob > 0.5, "p(Paris) = {}", top[0].prob);
}

#[test]
fn chat_answer_names_paris() {
    let e = engine();
    let ids = e.prompt_ids(&PromptSpec { text: "What is the capital of France?".into(), chat: None, messages: None }).unwrap();
    let mut streamed = String::new();
    let out = e
        .generate(
            &ids,
            &[Intervention::none()],
            &SamplingParams { max_new_tokens: 30, ..Default::default() },
            true,
            &Cancel::default(),
            &mut |_, t, _| {
                streamed.push_str(t);
                true
            },
        )
        .unwrap();
    assert!(out[0].text.contains("Paris"), "answer: {:?}", out[0].text);
    assert_eq!(streamed, out[0].text, "streamed text must add up to the answer");
}

#[test]
fn sweep_baseline_matches_next_token_and_clamps_move_probability() {
    let e = engine();
    let ids = e.prompt_ids(&plain("The capital of France is")).unwrap();
    let paris = e.tok.single_token(" Paris").unwrap();
    let top = e.next_token(&ids, &Intervention::none(), 1, &Cancel::default()).unwrap();
    let r = e.sweep(&ids, 20, 100, paris, &[-30.0, 0.0, 30.0], &Cancel::default()).unwrap();
    assert!((r.baseline - top[0].prob).abs() < 1e-5);
    assert!(r.natural_value.is_finite());
    assert!(r.probs.iter().all(|p| p.is_finite() && (0.0..=1.0).contains(p)));
    assert!(r.probs.iter().any(|p| (p - r.baseline).abs() > 1e-4), "clamping moved nothing: {r:?}");
}

/// The default way to hold this model (exact: the file's blocks, f32 activations) gives the
/// reference f32 numbers: logits within 1e-3 and the same greedy answers.
#[test]
fn exact_weights_give_the_f32_logits_and_answers() {
    let chat = |t: &str| PromptSpec { text: t.into(), chat: None, messages: None };
    let prompts =
        [plain("The capital of France is"), chat("What is the capital of France?"), chat("Write a long story about a dog who learns to fly.")];
    let worst = flash_interp_e2e::exact_agrees_with_f32(&default_model(), &prompts, 1e-3);
    eprintln!("exact vs f32: largest logit difference {worst:e}");
}

#[test]
fn quantized_mode_runs_and_stays_near_the_reference() {
    let q = Engine::load(&default_model(), &LoadOptions { mode: WeightMode::Quantized, ..Default::default() }).unwrap();
    let ids = q.prompt_ids(&plain("The capital of France is")).unwrap();
    let top = q.next_token(&ids, &Intervention::none(), 5, &Cancel::default()).unwrap();
    assert!(top.iter().any(|t| t.text == " Paris"), "quantized top-5: {top:?}");
}

#[test]
fn map_and_search_cover_every_neuron_and_the_top_dog_neuron_steers_toward_dog() {
    let e = engine();
    let cfg = e.config();
    let (map, _) = e.map(shared::View::Up, false, &|_, _| {}).unwrap();
    assert_eq!(map.n_neurons(), cfg.n_layers * cfg.d_ff);
    let dog = e.tok.single_token(" dog").unwrap();
    let r = flash_interp::analysis::search(e, &map, &[dog], 5).unwrap();
    let layers = r.signed_layers(cfg.d_ff);
    assert_eq!(layers.len(), 30);
    assert!(layers.iter().all(|l| l.len() == 1536 && l.iter().all(|x| x.is_finite())));
    // The map's first neuron for " dog". Which sign steers toward dog is what the neuron writes:
    // the polarity in which its down column decodes to " dog".
    let hit = &r.top[0];
    assert!(hit.top_tokens.iter().any(|t| t.to_lowercase().contains("dog")), "{hit:?}");
    let (down, _) = e.map(shared::View::Down, false, &|_, _| {}).unwrap();
    let down_scores = flash_interp::analysis::search(e, &down, &[dog], 1).unwrap();
    let i = hit.layer * cfg.d_ff + hit.neuron;
    let sign = if down_scores.pos[i] >= down_scores.neg[i] { 1.0 } else { -1.0 };
    let ids = e.prompt_ids(&plain("My favourite animal is the")).unwrap();
    let s = e.sweep(&ids, hit.layer, hit.neuron, dog, &[sign * 20.0, -sign * 20.0], &Cancel::default()).unwrap();
    assert!(s.probs[0] > 2.0 * s.baseline, "clamp {}:{} to {}: p(dog) {} vs baseline {}", hit.layer, hit.neuron, sign * 20.0, s.probs[0], s.baseline);
    assert!(s.probs[1] < s.baseline, "the opposite sign should lower p(dog): {s:?}");
}

#[test]
fn causal_verification_confirms_the_dog_neuron_and_a_phrase_neuron_says_the_phrase() {
    use flash_interp::analysis::{verify, VerifyPlan};
    use shared::{Concept, VerifyRequest, View};
    let e = engine();
    let maps: Vec<_> = View::ALL.iter().map(|&v| e.map(v, false, &|_, _| {}).unwrap().0).collect();
    let req = VerifyRequest {
        concept: Concept::Tokens(vec![" dog".into()]),
        prompts: vec![plain("My dog and I went for a walk. The word I am thinking of is")],
        candidates: 8,
        values: 9,
        range: 10.0,
    };
    let r = verify(e, &maps, &VerifyPlan::new(e, &req).unwrap(), &Cancel::default()).unwrap();
    let top = &r.neurons[0];
    // The map's first candidate is the causal first: clamped high, p(" dog") rises many-fold.
    assert_eq!((top.layer, top.neuron, top.map_rank), (29, 808, 0), "{top:?}");
    assert!(top.effect > 2.0 && top.best_prob > 5.0 * r.baseline, "{top:?}, baseline {}", r.baseline);
    // The curve is what a sweep of that neuron measures.
    let ids = e.prompt_ids(&req.prompts[0]).unwrap();
    let values: Vec<f32> = top.curve.iter().map(|p| p.value).collect();
    let s = e.sweep(&ids, 29, 808, e.tok.single_token(" dog").unwrap(), &values, &Cancel::default()).unwrap();
    for (p, q) in top.curve.iter().zip(&s.probs) {
        assert!((p.prob - q).abs() < 1e-4 * q.max(1e-3), "{p:?} vs {q}");
    }

    // A phrase: the causal first for " Sherlock Holmes" makes the greedy answer say it.
    let req = VerifyRequest {
        concept: Concept::Phrase(" Sherlock Holmes".into()),
        prompts: vec![plain("The famous detective is"), plain("My favourite book character is")],
        candidates: 8,
        values: 9,
        range: 10.0,
    };
    let r = verify(e, &maps, &VerifyPlan::new(e, &req).unwrap(), &Cancel::default()).unwrap();
    assert!(r.phrase && r.tokens.len() == 3, "{:?}", r.tokens);
    let top = &r.neurons[0];
    assert!(top.effect > 2.0, "{top:?}");
    let clamp = shared::ClampSpec { layer: top.layer, neuron: top.neuron, value: top.best_value };
    let ids = e.prompt_ids(&plain("The famous detective is")).unwrap();
    let params = SamplingParams { max_new_tokens: 12, ..Default::default() };
    let iv = e.intervention(&[clamp]).unwrap();
    let out = e.generate(&ids, &[Intervention::none(), iv], &params, true, &Cancel::default(), &mut |_, _, _| true).unwrap();
    assert!(
        !out[0].text.contains("Sherlock Holmes") && out[1].text.contains("Sherlock Holmes"),
        "normal {:?}, steered {:?}",
        out[0].text,
        out[1].text
    );
}

#[test]
fn neuron_classes_follow_gurnee_prediction_late_and_suppression_last() {
    let e = engine();
    let (down, _) = e.map(shared::View::Down, false, &|_, _| {}).unwrap();
    let c = flash_interp::analysis::classes(e, &down, shared::NeuronClass::Prediction, 10).unwrap();
    let sum = |ls: &[shared::LayerClassCounts]| ls.iter().map(|l| l.prediction + l.suppression).sum::<usize>();
    let (early, late) = (sum(&c.layers[..20]), sum(&c.layers[20..]));
    assert!(late > 10 * early.max(1), "prediction and suppression neurons live in the late layers: {early} early, {late} late");
    let last = c.layers[29];
    assert!(last.suppression > last.prediction, "suppression neurons dominate the last layer: {last:?}");
    // The strongest prediction neurons are heavy-tailed to the right and decode to a token family.
    let n = &c.neurons[0];
    assert!(n.moments.kurtosis > 30.0 && n.moments.skew > 1.0, "{n:?}");
}

/// The home page's gallery of the default model: see [`flash_interp_e2e::check_gallery`].
#[test]
fn gallery_examples_are_found_by_search_and_still_steer() {
    flash_interp_e2e::check_gallery(engine());
}

/// Streaming decodes a window per token; the pieces add up to the whole decode, multi-byte
/// characters split across tokens included.
#[test]
fn streamed_text_adds_up_to_the_decoded_text() {
    let e = engine();
    let text = "Le café ☕ coûte 3 €; 狗 means dog 🐕. Done.";
    let ids = e.tok.encode_raw(text).unwrap();
    let mut stream = flash_interp::tokenizer::TextStream::default();
    let mut streamed = String::new();
    for n in 1..=ids.len() {
        let piece = e.tok.decode_step(&mut stream, &ids[..n]).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        streamed.push_str(&piece);
    }
    assert_eq!(streamed, e.tok.decode(&ids).unwrap());
    assert_eq!(streamed, text);
}

#[test]
fn concurrent_requests_in_the_servers_batch_answer_as_they_do_alone() {
    use flash_interp::batch::{Batcher, Job};
    use flash_interp::model::Clamp;
    let e = std::sync::Arc::new(Engine::load(&default_model(), &LoadOptions::default()).unwrap());
    let b = std::sync::Arc::new(Batcher::new(e.clone()));
    let chat = |t: &str| e.prompt_ids(&PromptSpec { text: t.into(), chat: None, messages: None }).unwrap();
    let steer = Intervention { clamps: vec![Clamp { layer: 29, neuron: 808, value: 40.0 }] };
    let sampled = SamplingParams { temperature: 0.8, seed: 7, max_new_tokens: 20, ..Default::default() };
    let reqs = [
        (chat("What is the capital of France?"), vec![Intervention::none()], SamplingParams { max_new_tokens: 30, ..Default::default() }),
        (chat("Tell me about your favourite animal."), vec![Intervention::none(), steer], sampled.clone()),
        (chat("Name a colour."), vec![Intervention::none(); 3], sampled),
    ];
    let rxs: Vec<_> = reqs
        .iter()
        .map(|(ids, variants, params)| {
            let (tx, rx) = std::sync::mpsc::channel();
            // Which prompt finishes first is up to the scheduler: on a busy machine one job
            // could answer alone before the others' prompts have run. Until a step has been
            // shared, each token gives the prompts' threads a second to come (it waits on the
            // batch thread itself, so the others join between its steps).
            let batch = std::sync::Arc::downgrade(&b);
            let on_text: flash_interp::batch::OnText = Box::new(move |_, _, _| {
                if batch.upgrade().is_some_and(|b| {
                    let (steps, job_steps) = b.steps();
                    job_steps == steps
                }) {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                true
            });
            b.submit(Job {
                ids: ids.clone(),
                variants: variants.clone(),
                seeds: (0..variants.len() as u64).map(|s| params.seed + s / 2).collect(),
                params: params.clone(),
                cancel: Cancel::default(),
                on_text,
                done: Box::new(move |out| {
                    let _ = tx.send(out.unwrap());
                }),
                hold: None,
            });
            rx
        })
        .collect();
    let mut answers = Vec::new();
    for ((ids, variants, params), rx) in reqs.iter().zip(rxs) {
        let got = rx.recv_timeout(std::time::Duration::from_secs(120)).unwrap();
        let seeds: Vec<u64> = (0..variants.len() as u64).map(|s| params.seed + s / 2).collect();
        let alone = e.generate_rows(ids, variants, &seeds, params, true, &Cancel::default(), &mut |_, _, _| true).unwrap();
        // Up to 16 rows, each row's products are bit for bit those of the row alone.
        for (g, a) in got.iter().zip(&alone) {
            assert_eq!(g.tokens, a.tokens, "{:?} vs {:?}", g.text, a.text);
        }
        answers.push(got);
    }
    assert!(answers[0][0].text.contains("Paris"), "{:?}", answers[0][0].text);
    assert_ne!(answers[1][0].text, answers[1][1].text, "the clamp steers its own row only");
    let (steps, job_steps) = b.steps();
    assert!(job_steps > steps, "the requests never shared a step");
}
