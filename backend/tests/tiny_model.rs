//! Engine tests on tiny random-weight models written by the tests themselves (GGUF and
//! safetensors). Each test compares against an independent computation: candle-transformers'
//! own Llama implementations, a separate run, or an identity that must hold.

use candle_core::{DType, Device, IndexOp, Tensor};
use flash_interp::engine::{Engine, LoadOptions};
use flash_interp::model::{Cache, Clamp, Intervention, WeightMode};
use flash_interp::synthetic::{self, TinySpec};
use flash_interp::Cancel;
use flash_interp::Error;
use shared::{PromptSpec, SamplingParams};

struct Tiny {
    _dir: tempfile::TempDir,
    gguf: std::path::PathBuf,
    hf: std::path::PathBuf,
}

fn tiny(spec: &TinySpec) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let hf = dir.path().join("tiny-hf");
    synthetic::write_gguf(spec, &gguf).unwrap();
    synthetic::write_hf_dir(spec, &hf).unwrap();
    Tiny { _dir: dir, gguf, hf }
}

fn load(path: &std::path::Path) -> Engine {
    Engine::load(path, &LoadOptions::default()).unwrap()
}

fn logits(e: &Engine, ids: &[u32], iv: &Intervention) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let out = e.model.forward(&x, &mut Cache::new(e.config()), std::slice::from_ref(iv), &[]).unwrap();
    out.logits.i(0).unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const IDS: [u32; 7] = [1, 40, 77, 263, 5, 120, 99];

#[test]
fn forward_matches_candle_transformers_llama_on_safetensors() {
    // candle-transformers' Llama (HF layout, split-halves RoPE) is an independent implementation
    // with no intervention code: our forward with an empty intervention must match it.
    for tied in [true, false] {
        let spec = TinySpec { tied, ..Default::default() };
        let t = tiny(&spec);
        let ours = load(&t.hf);
        let lc: candle_transformers::models::llama::LlamaConfig = serde_json::from_slice(&std::fs::read(t.hf.join("config.json")).unwrap()).unwrap();
        let cfg = lc.into_config(false);
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[t.hf.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
        let reference = candle_transformers::models::llama::Llama::load(vb, &cfg).unwrap();
        for n in [1, 3, IDS.len()] {
            let mut cache = candle_transformers::models::llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
            let x = Tensor::new(&IDS[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let want: Vec<f32> = reference.forward(&x, 0, &mut cache).unwrap().i(0).unwrap().to_vec1().unwrap();
            let got = logits(&ours, &IDS[..n], &Intervention::none());
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "tied={tied} n={n}: max |diff| {d}");
        }
    }
}

#[test]
fn forward_matches_candle_quantized_llama_on_gguf() {
    // candle-transformers' quantized_llama reads the same GGUF with the interleaved RoPE.
    let t = tiny(&TinySpec::default());
    let ours = load(&t.gguf);
    let mut f = std::fs::File::open(&t.gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let x = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let want: Vec<f32> = reference.forward(&x, 0).unwrap().i(0).unwrap().to_vec1().unwrap();
    let got = logits(&ours, &IDS, &Intervention::none());
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn gguf_and_safetensors_loaders_give_the_same_logits() {
    // Same weights; the GGUF has llama.cpp's permuted Q/K rows, so this checks the RoPE layouts.
    let t = tiny(&TinySpec::default());
    let (a, b) = (load(&t.gguf), load(&t.hf));
    assert_eq!(a.config().n_layers, b.config().n_layers);
    assert!(a.config().tied_embeddings && b.config().tied_embeddings);
    for n in [1, 4, IDS.len()] {
        let d = max_abs_diff(&logits(&a, &IDS[..n], &Intervention::none()), &logits(&b, &IDS[..n], &Intervention::none()));
        assert!(d < 1e-4, "n={n}: max |diff| {d}");
    }
}

#[test]
fn q8_0_gguf_is_close_to_f32_and_quantized_mode_runs() {
    let f32m = tiny(&TinySpec::default());
    let q8 = tiny(&TinySpec { q8: true, ..Default::default() });
    let reference = logits(&load(&f32m.gguf), &IDS, &Intervention::none());
    let dequant = logits(&load(&q8.gguf), &IDS, &Intervention::none());
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let d = max_abs_diff(&reference, &dequant);
    assert!(d > 0.0 && d < 0.05 * scale, "Q8_0 dequantized: max |diff| {d} (logit scale {scale})");
    let quant = Engine::load(&q8.gguf, &LoadOptions { mode: WeightMode::Quantized, ..Default::default() }).unwrap();
    let q = logits(&quant, &IDS, &Intervention::none());
    let dq = max_abs_diff(&reference, &q);
    assert!(dq < 0.1 * scale, "quantized matmuls: max |diff| {dq} (logit scale {scale})");
}

#[test]
fn empty_intervention_is_exactly_the_plain_forward() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let x = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let plain = e.model.forward(&x, &mut Cache::new(e.config()), &[], &[]).unwrap().logits;
    let empty = e.model.forward(&x, &mut Cache::new(e.config()), &[Intervention::none()], &[]).unwrap().logits;
    let a: Vec<f32> = plain.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = empty.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
}

#[test]
fn clamping_a_neuron_to_its_natural_value_changes_nothing() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let ids = [40u32]; // one position: the natural value is a single number
    let x = Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let layers: Vec<usize> = (0..e.config().n_layers).collect();
    let out = e.model.forward(&x, &mut Cache::new(e.config()), &[], &layers).unwrap();
    let plain: Vec<f32> = out.logits.i(0).unwrap().to_vec1().unwrap();
    for (layer, acts) in &out.mlp_acts {
        for neuron in [0, 17, e.config().d_ff - 1] {
            let natural: f32 = acts.i((0, 0, neuron)).unwrap().to_scalar().unwrap();
            let same = logits(&e, &ids, &Intervention { clamps: vec![Clamp { layer: *layer, neuron, value: natural }] });
            assert_eq!(plain, same, "layer {layer} neuron {neuron} natural {natural}");
            // And the clamp is not a no-op: a different value changes the logits.
            let moved = logits(&e, &ids, &Intervention { clamps: vec![Clamp { layer: *layer, neuron, value: natural + 5.0 }] });
            assert!(max_abs_diff(&plain, &moved) > 1e-3, "layer {layer} neuron {neuron}: clamp had no effect");
        }
    }
}

#[test]
fn clamp_sets_the_activation_at_every_position() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let x = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let iv = Intervention { clamps: vec![Clamp { layer: 1, neuron: 5, value: 3.25 }, Clamp { layer: 1, neuron: 9, value: -2.0 }] };
    let out = e.model.forward(&x, &mut Cache::new(e.config()), &[iv], &[1]).unwrap();
    let acts = &out.mlp_acts[0].1;
    let n5: Vec<f32> = acts.i((0, .., 5)).unwrap().to_vec1().unwrap();
    let n9: Vec<f32> = acts.i((0, .., 9)).unwrap().to_vec1().unwrap();
    assert!(n5.iter().all(|&v| v == 3.25) && n9.iter().all(|&v| v == -2.0));
    assert_eq!(n5.len(), IDS.len());
}

fn gen(e: &Engine, variants: &[Intervention], params: &SamplingParams, cache: bool) -> Vec<flash_interp::engine::GenOutput> {
    let ids = e.prompt_ids(&PromptSpec { text: "the cat".into(), chat: Some(true), messages: None }).unwrap();
    e.generate(&ids, variants, params, cache, &Cancel::default(), &mut |_, _, _| true).unwrap()
}

#[test]
fn cached_and_uncached_generation_agree() {
    let t = tiny(&TinySpec { scale: 2.0, ..Default::default() });
    let e = load(&t.gguf);
    let steer = Intervention { clamps: vec![Clamp { layer: 2, neuron: 3, value: 6.0 }] };
    for temperature in [0.0, 0.9] {
        let params = SamplingParams { temperature, top_p: Some(0.95), seed: 11, max_new_tokens: 24 };
        for variants in [vec![Intervention::none()], vec![Intervention::none(), steer.clone()]] {
            let a = gen(&e, &variants, &params, true);
            let b = gen(&e, &variants, &params, false);
            assert_eq!(a.iter().map(|g| &g.tokens).collect::<Vec<_>>(), b.iter().map(|g| &g.tokens).collect::<Vec<_>>());
            assert!(a.iter().all(|g| !g.tokens.is_empty()));
            // Same seed, same input: the same text again.
            let c = gen(&e, &variants, &params, true);
            for (x, y) in a.iter().zip(&c) {
                assert_eq!((&x.tokens, &x.text, x.stop), (&y.tokens, &y.text, y.stop));
            }
        }
    }
}

#[test]
fn paired_generation_equals_two_separate_generations() {
    // The paired mode shares the prompt's computation below the clamped layer and runs both rows
    // as one batch; each row must equal its own single run.
    let t = tiny(&TinySpec { scale: 2.0, ..Default::default() });
    let e = load(&t.gguf);
    let steer = Intervention { clamps: vec![Clamp { layer: 1, neuron: 20, value: 8.0 }] };
    let params = SamplingParams { temperature: 0.7, top_p: None, seed: 5, max_new_tokens: 20 };
    let pair = gen(&e, &[Intervention::none(), steer.clone()], &params, true);
    let normal = gen(&e, &[Intervention::none()], &params, true);
    let steered = gen(&e, &[steer], &params, true);
    assert_eq!(pair[0].tokens, normal[0].tokens);
    assert_eq!(pair[1].tokens, steered[0].tokens);
    assert_ne!(pair[0].tokens, pair[1].tokens, "a strong clamp should change the answer");
}

#[test]
fn sweep_equals_separate_clamped_forwards() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let (layer, neuron, target) = (1, 7, 120u32);
    let values = [-4.0f32, 0.0, 1.5, 10.0];
    let r = e.sweep(&IDS, layer, neuron, target, &values, &Cancel::default()).unwrap();
    let prob = |iv: &Intervention| {
        let l = logits(&e, &IDS, iv);
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = l.iter().map(|x| (x - m).exp()).sum();
        (l[target as usize] - m).exp() / z
    };
    assert!((r.baseline - prob(&Intervention::none())).abs() < 1e-6);
    for (v, p) in values.iter().zip(&r.probs) {
        let want = prob(&Intervention { clamps: vec![Clamp { layer, neuron, value: *v }] });
        assert!((p - want).abs() < 1e-6, "value {v}: sweep {p} vs separate {want}");
    }
    assert!(r.probs.iter().any(|p| (p - r.baseline).abs() > 1e-4), "the sweep moved nothing");
    // The natural value reported is the unclamped activation at the last position.
    let x = Tensor::new(&IDS[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let out = e.model.forward(&x, &mut Cache::new(e.config()), &[], &[layer]).unwrap();
    let natural: f32 = out.mlp_acts[0].1.i((0, IDS.len() - 1, neuron)).unwrap().to_scalar().unwrap();
    // The same up to summation order: the sweep's batch of values is one large product, the
    // prompt alone a product of a few rows.
    assert!((r.natural_value - natural).abs() <= 1e-5 * natural.abs().max(1.0), "{} vs {natural}", r.natural_value);
}

#[test]
fn next_token_matches_softmax_of_the_logits() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.hf);
    let top = e.next_token(&IDS, &Intervention::none(), 5, &Cancel::default()).unwrap();
    let l = logits(&e, &IDS, &Intervention::none());
    let mut sorted = l.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(top.len(), 5);
    for (t, want) in top.iter().zip(&sorted) {
        assert_eq!(t.logit, *want);
        assert_eq!(l[t.id as usize], t.logit);
    }
    let total: f32 = top.iter().map(|t| t.prob).sum();
    assert!(total > 0.0 && total <= 1.0 + 1e-6);
}

#[test]
fn gguf_tokenizer_agrees_with_tokenizer_json() {
    let t = tiny(&TinySpec::default());
    let (a, b) = (load(&t.gguf), load(&t.hf));
    for s in ["the cat in the hat", "dog 2024 has 365 days", "<|im_start|>user\nhi<|im_end|>", "héllo wörld!"] {
        let ia = a.tok.encode_raw(s).unwrap();
        assert_eq!(ia, b.tok.encode_raw(s).unwrap(), "{s:?}");
        assert_eq!(a.tok.decode(&ia).unwrap(), s);
    }
    // Digits split one by one; merges apply; special tokens are matched whole.
    assert_eq!(a.tok.encode_raw("2024").unwrap().len(), 4);
    assert_eq!(a.tok.encode_raw(" the").unwrap().len(), 1);
    assert_eq!(a.tok.encode_raw("<|im_end|>").unwrap(), vec![2]);
    assert_eq!(a.tok.eos_ids, vec![2]);
}

#[test]
fn chat_prompt_uses_the_models_template() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let ids = e.prompt_ids(&PromptSpec { text: "hi".into(), chat: None, messages: None }).unwrap();
    let manual = e.tok.encode_raw("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").unwrap();
    assert_eq!(ids, manual);
    let plain = e.prompt_ids(&PromptSpec { text: "hi".into(), chat: Some(false), messages: None }).unwrap();
    assert_eq!(plain, e.tok.encode_raw("hi").unwrap());
}

#[test]
fn single_token_errors_show_the_tokenization_and_suggest_variants() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    assert_eq!(e.tok.single_token(" the").unwrap(), e.tok.encode_raw(" the").unwrap()[0]);
    let err = e.tok.single_token("the").unwrap_err().to_string();
    assert!(err.contains("not a single token") && err.contains("\" the\""), "{err}");
}

#[test]
fn every_token_reads_back_as_itself_and_byte_pieces_show_their_bytes() {
    use flash_interp::tokenizer::{escape_bytes, unescape_bytes};
    let t = tiny(&TinySpec::default());
    for e in [load(&t.gguf), load(&t.hf)] {
        let tok = &e.tok;
        for id in 0..tok.vocab_size() as u32 {
            let text = tok.token_text(id);
            assert!(!text.contains('\u{FFFD}'), "token {id} reads {text:?}");
            assert_eq!(tok.single_token(&text).unwrap(), id, "token {id} reads {text:?}");
        }
        // "é" is the bytes C3 A9: each alone is part of a character, written as its byte.
        let ids = tok.encode_raw("é").unwrap();
        assert_eq!(ids.iter().map(|&i| tok.token_text(i)).collect::<Vec<_>>(), ["\\xC3", "\\xA9"]);
        assert_eq!(tok.decode(&ids).unwrap(), "é", "decoding a sequence is unchanged");
        let err = tok.single_token("\\xC3\\xA9").unwrap_err().to_string();
        assert!(err.contains("the bytes C3 A9, and no single token stands for them"), "no token is both bytes: {err}");
    }
    // Escaping and reading back are exact for any bytes, a backslash before "x" and two hex
    // digits included (written \x5C): every string of up to 5 of these bytes.
    let alphabet = [b'\\', b'x', b'E', b'2', b'z', 0xE2, 0x82, 0xAC];
    for n in 0..=5u32 {
        for mut k in 0..alphabet.len().pow(n) {
            let mut bytes = vec![];
            for _ in 0..n {
                bytes.push(alphabet[k % alphabet.len()]);
                k /= alphabet.len();
            }
            let text = escape_bytes(&bytes);
            match unescape_bytes(&text) {
                Some(back) => assert_eq!(back, bytes, "{text:?}"),
                None => assert_eq!(text.as_bytes(), bytes, "no escape: the text is the bytes"),
            }
        }
    }
    assert_eq!(escape_bytes(b"\\xff"), "\\x5Cxff");
    assert_eq!(escape_bytes(b"\\n \\x"), "\\n \\x", "a backslash that reads as no escape stays");
    assert_eq!(escape_bytes(b"a\xE2\x80 \xC3\xA9"), "a\\xE2\\x80 é");
    assert_eq!(unescape_bytes("a\\xE2\\x80 é").unwrap(), b"a\xE2\x80 \xC3\xA9");
    for plain in ["no escape", "\\x+1", "\\xG0", "\\x4", "tail \\x"] {
        assert_eq!(unescape_bytes(plain), None, "{plain:?}");
    }
}

#[test]
fn quoted_token_texts_show_what_is_invisible_and_nothing_else() {
    use flash_interp::tokenizer::quoted;
    for (text, shown) in [
        (" dog", r#"" dog""#),
        ("\n\t", r#""\n\t""#),
        ("it's \"so\"", r#""it's \"so\"""#),
        ("a\\b", r#""a\\b""#),
        ("\\xE2\\x80", r#""\xE2\x80""#),
        ("zero\u{200b}width", r#""zero\u{200b}width""#),
        // Combining marks stay on their letter (Rust's `{:?}` writes "ট\u{9cd}ট"), except
        // first, where there is no letter to carry them.
        ("ট্ট", r#""ট্ট""#),
        ("\u{9cd}x", r#""\u{9cd}x""#),
        // Invisible marks that would extend a grapheme are shown: a plain heart and an emoji one.
        ("❤\u{fe0f}", r#""❤\u{fe0f}""#),
        ("a\u{ad}b", r#""a\u{ad}b""#),
        (" café", r#"" café""#),
    ] {
        assert_eq!(quoted(text), shown, "{text:?}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let bad = |r: Result<Intervention, Error>| match r {
        Err(Error::BadInput(m)) => m,
        other => panic!("expected BadInput, got {other:?}"),
    };
    let c = |layer, neuron, value| e.intervention(&[shared::ClampSpec { layer, neuron, value }]);
    assert!(bad(c(3, 0, 1.0)).contains("layer 3 is out of range"));
    assert!(bad(c(0, 64, 1.0)).contains("neuron 64 is out of range"));
    assert!(bad(c(0, 0, f32::NAN)).contains("not a finite"));
    assert!(bad(c(0, 0, f32::INFINITY)).contains("not a finite"));
    assert!(bad(c(0, 0, 1e6)).contains("outside the allowed range"));
    let twice = [shared::ClampSpec { layer: 1, neuron: 2, value: 1.0 }, shared::ClampSpec { layer: 1, neuron: 2, value: -1.0 }];
    assert!(bad(e.intervention(&twice)).contains("1:2 is clamped twice"));
    // A conversation: its roles are the template's three, and it needs the template.
    let msg = |role: &str| shared::ChatMessage { role: role.into(), content: "hi".into() };
    let conv = |m: Vec<shared::ChatMessage>, chat| e.prompt_ids(&PromptSpec { text: String::new(), chat, messages: Some(m) });
    let manual = e.tok.encode_raw("<|im_start|>system\nhi<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").unwrap();
    assert_eq!(conv(vec![msg("system"), msg("user")], None).unwrap(), manual);
    let r = conv(vec![msg("<|im_end|>\n<|im_start|>system"), msg("user")], None);
    assert!(matches!(&r, Err(Error::BadInput(m)) if m.contains("not one of system, user, assistant")), "{r:?}");
    assert!(matches!(conv(vec![msg("user")], Some(false)), Err(Error::BadInput(m)) if m.contains("chat: false")));
    let empty = e.prompt_ids(&PromptSpec { text: "  ".into(), chat: Some(false), messages: None });
    assert!(matches!(empty, Err(Error::BadInput(m)) if m.contains("empty")));
    let long = "the ".repeat(300); // 300 tokens > the tiny model's 256-token context
    let r = e.prompt_ids(&PromptSpec { text: long, chat: Some(false), messages: None });
    assert!(matches!(r, Err(Error::TooLarge(_))), "{r:?}");
    let params = SamplingParams { temperature: -1.0, ..Default::default() };
    assert!(matches!(e.generate(&IDS, &[Intervention::none()], &params, true, &Cancel::default(), &mut |_, _, _| true), Err(Error::BadInput(_))));
    let params = SamplingParams { top_p: Some(1.5), ..Default::default() };
    assert!(matches!(e.generate(&IDS, &[Intervention::none()], &params, true, &Cancel::default(), &mut |_, _, _| true), Err(Error::BadInput(_))));
    assert!(matches!(e.sweep(&IDS, 0, 0, 5, &[f32::NAN], &Cancel::default()), Err(Error::BadInput(_))));
    assert!(matches!(e.sweep(&IDS, 0, 0, 5, &[], &Cancel::default()), Err(Error::BadInput(_))));
    assert!(matches!(e.sweep(&IDS, 0, 0, 100_000, &[1.0], &Cancel::default()), Err(Error::BadInput(_))));
    // The engine still works after all that.
    assert_eq!(logits(&e, &IDS, &Intervention::none()).len(), synthetic::vocab().len());
}

#[test]
fn truncated_and_foreign_files_are_rejected() {
    let t = tiny(&TinySpec::default());
    let bytes = std::fs::read(&t.gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let err = Engine::load(&cut, &LoadOptions::default()).err().expect("truncated file must fail");
    assert!(matches!(&err, Error::Model { message, .. } if message.contains("truncated")), "{err}");
    let header_only = dir.path().join("head.gguf");
    std::fs::write(&header_only, &bytes[..100]).unwrap();
    assert!(matches!(Engine::load(&header_only, &LoadOptions::default()), Err(Error::Model { .. })));
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "this is not a model").unwrap();
    let err = Engine::load(&text, &LoadOptions::default()).err().unwrap();
    assert!(err.to_string().contains("not a readable GGUF"), "{err}");
    assert!(matches!(Engine::load(&dir.path().join("missing.gguf"), &LoadOptions::default()), Err(Error::Model { .. })));
}

#[test]
fn wrong_sha256_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    std::fs::write(&f, b"abc").unwrap();
    let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"; // sha256("abc")
    flash_interp::fetch::verify_sha256(&f, want).unwrap();
    let err = flash_interp::fetch::verify_sha256(&f, flash_interp::fetch::GGUF_SHA256).unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }) && err.to_string().contains("expected"));
}

#[test]
fn every_valid_temperature_and_top_p_gives_an_answer() {
    // Temperatures and top-p values this small used to overflow the sampler's softmax (a 500):
    // they are valid input and mean greedy.
    let t = tiny(&TinySpec { scale: 2.0, ..Default::default() });
    let e = load(&t.gguf);
    let run = |temperature: f64, top_p: Option<f64>| {
        let params = SamplingParams { temperature, top_p, max_new_tokens: 12, seed: 3 };
        e.generate(&IDS, &[Intervention::none()], &params, true, &Cancel::default(), &mut |_, _, _| true).unwrap()[0].tokens.clone()
    };
    let greedy = run(0.0, None);
    for t in [1e-38, 1e-45, 1e-300, 5e-324] {
        assert_eq!(run(t, None), greedy, "temperature {t}");
    }
    assert_eq!(run(1.0, Some(1e-300)), greedy);
    assert_eq!(run(5.0, Some(1.0)).len(), 12, "the largest temperature samples too");
}

#[test]
fn cancelled_work_stops_with_cancelled() {
    let t = tiny(&TinySpec::default());
    let e = load(&t.gguf);
    let cancel = Cancel::default();
    cancel.cancel();
    let params = SamplingParams { max_new_tokens: 50, ..Default::default() };
    let r = e.generate(&IDS, &[Intervention::none()], &params, true, &cancel, &mut |_, _, _| true);
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(matches!(e.sweep(&IDS, 1, 2, 5, &[1.0, 2.0], &cancel), Err(Error::Cancelled)));
    assert!(matches!(e.next_token(&IDS, &Intervention::none(), 3, &cancel), Err(Error::Cancelled)));
    // Cancelled in the middle (as the server does when the client leaves): no more tokens.
    let live = Cancel::default();
    let mut seen = 0;
    let params = SamplingParams { max_new_tokens: 50, temperature: 1.0, ..Default::default() };
    let r = e.generate(&IDS, &[Intervention::none()], &params, true, &live.clone(), &mut |_, _, _| {
        seen += 1;
        if seen == 3 {
            live.cancel();
        }
        true
    });
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(seen, 3);
}

#[test]
fn non_finite_weights_are_refused_at_load() {
    for (name, value) in [("blk.1.attn_norm.weight", f32::NAN), ("output_norm.weight", f32::INFINITY), ("token_embd.weight", f32::NEG_INFINITY)] {
        let t = tiny(&TinySpec::default());
        synthetic::overwrite_f32(&t.gguf, name, value).unwrap();
        for mode in [WeightMode::Dense(DType::F32), WeightMode::Quantized] {
            let err = Engine::load(&t.gguf, &LoadOptions { mode, ..Default::default() }).err().expect("a NaN weight must not load");
            assert!(matches!(&err, Error::Model { message, .. } if message.contains(name) && message.contains("NaN or infinite")), "{err}");
        }
    }
}

#[test]
fn work_estimates_count_what_the_forward_computes() {
    let spec = TinySpec::default();
    let t = tiny(&spec);
    let e = load(&t.gguf);
    let c = e.config().clone();
    let (d, q, kv, ff, v) =
        (c.d_model as f64, (c.n_heads * c.head_dim) as f64, (c.n_kv_heads * c.head_dim) as f64, c.d_ff as f64, c.vocab_size as f64);
    // By hand: per token and layer the q, k, v, o and gate/up/down products (2 FLOPs per
    // multiply-add), the attention over all positions; then the LM head on the last position.
    let per_token = 2.0 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * ff);
    let layer = |t: f64, past: f64| t * per_token + 4.0 * q * t * (past + t);
    // A prompt of more than two blocks of 128 queries: each block against the keys up to its own
    // last position (128 × 128, 128 × 256, then 44 × 300), not the whole 300 × 300 square.
    let blocked = |past: f64| 300.0 * per_token + 4.0 * q * (128.0 * (past + 128.0) + 128.0 * (past + 256.0) + 44.0 * (past + 300.0));
    let layers = c.n_layers as f64;
    // Streamed bytes: every f32 weight once (the tied embedding as the LM head), and per layer
    // and row the key/value cache read, extended and repeated over the heads.
    let weight_bytes = 4.0 * (layers * (d * q + 2.0 * d * kv + q * d + 3.0 * d * ff + 2.0 * d) + v * d + d);
    let cache = |layer_rows: f64, ctx: f64| layer_rows * (4.0 * kv + 2.0 * q) * ctx * 4.0;
    let k = flash_interp::engine::STREAM_FLOPS_PER_BYTE;
    let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-9 * b, "{a} vs {b}");
    close(e.forward_cost(7, 0, 1, 0), layers * layer(7.0, 0.0) + 2.0 * d * v + k * (weight_bytes + cache(layers, 7.0)));
    // Two rows from layer 1 on: layer 0 once, the others twice, and two LM heads.
    let layer_rows = 1.0 + 2.0 * (layers - 1.0);
    close(e.forward_cost(7, 0, 2, 1), layer_rows * layer(7.0, 0.0) + 4.0 * d * v + k * (weight_bytes + cache(layer_rows, 7.0)));
    close(e.forward_cost(300, 0, 1, 0), layers * blocked(0.0) + 2.0 * d * v + k * (weight_bytes + cache(layers, 300.0)));
    close(e.forward_cost(300, 9, 1, 0), layers * blocked(9.0) + 2.0 * d * v + k * (weight_bytes + cache(layers, 309.0)));
    // One decoding step with 7 positions cached.
    close(e.forward_cost(1, 7, 1, 0), layers * layer(1.0, 7.0) + 2.0 * d * v + k * (weight_bytes + cache(layers, 8.0)));
    // A generation: the prompt, then each token with a growing context.
    let one = [Intervention::none()];
    let want = e.forward_cost(7, 0, 1, 0) + (0..5).map(|s| e.forward_cost(1, 7 + s, 1, 0)).sum::<f64>();
    close(e.generate_cost(7, &one, 5), want);
    // More values, a lower layer and a longer prompt all cost more.
    assert!(e.sweep_cost(7, 0, 10) > e.sweep_cost(7, 2, 10));
    assert!(e.sweep_cost(7, 1, 20) > e.sweep_cost(7, 1, 10));
    assert!(e.sweep_cost(50, 1, 10) > e.sweep_cost(7, 1, 10));
    // Quantized weights stream fewer bytes than f32 ones: a cheaper step.
    let q8 = tiny(&TinySpec { q8: true, ..Default::default() });
    let quant = Engine::load(&q8.gguf, &LoadOptions { mode: WeightMode::Quantized, ..Default::default() }).unwrap();
    assert!(quant.forward_cost(1, 7, 1, 0) < e.forward_cost(1, 7, 1, 0));

    // Gemma 3: its local layers (every layer but each GEMMA_PATTERN-th) read only the keys in
    // their GEMMA_WINDOW-position window, block by block and step by step.
    let g = tiny(&TinySpec { gemma3: true, ..Default::default() });
    let g = load(&g.gguf);
    let c = g.config().clone();
    let (d, q, kv, ff, v) =
        (c.d_model as f64, (c.n_heads * c.head_dim) as f64, (c.n_kv_heads * c.head_dim) as f64, c.d_ff as f64, c.vocab_size as f64);
    let per_token = 2.0 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * ff);
    let global = |l: usize| (l + 1).is_multiple_of(synthetic::GEMMA_PATTERN);
    assert_eq!(synthetic::GEMMA_WINDOW, 4);
    // 300 prompt positions: a global layer's blocks as above; a local one's block 0 sees keys
    // 0..128, block 1 (queries 128..256) keys 125..256, block 2 (256..300) keys 253..300.
    let prompt_pairs = |l: usize| if global(l) { 128.0 * 128.0 + 128.0 * 256.0 + 44.0 * 300.0 } else { 128.0 * 128.0 + 128.0 * 131.0 + 44.0 * 47.0 };
    // One step after 7 cached positions: 8 keys, or the window's last 4.
    let step_pairs = |l: usize| if global(l) { 8.0 } else { 4.0 };
    let layers = 0..c.n_layers;
    assert!(layers.clone().any(global) && !layers.clone().all(global));
    let (gw, gl) = (g.model.weight_bytes() as f64, c.n_layers as f64);
    let cache = |ctx: f64| gl * (4.0 * kv + 2.0 * q) * ctx * 4.0;
    let prompt: f64 = layers.clone().map(|l| 300.0 * per_token + 4.0 * q * prompt_pairs(l)).sum();
    close(g.forward_cost(300, 0, 1, 0), prompt + 2.0 * d * v + k * (gw + cache(300.0)));
    let step: f64 = layers.map(|l| per_token + 4.0 * q * step_pairs(l)).sum();
    close(g.forward_cost(1, 7, 1, 0), step + 2.0 * d * v + k * (gw + cache(8.0)));
}

#[test]
fn token_steps_give_each_tokens_probability_and_add_up_to_the_text() {
    let t = tiny(&TinySpec { scale: 2.0, ..Default::default() });
    let e = load(&t.gguf);
    let ids = e.prompt_ids(&PromptSpec { text: "the cat".into(), chat: Some(true), messages: None }).unwrap();
    let variants = [Intervention::none(), Intervention { clamps: vec![Clamp { layer: 2, neuron: 3, value: 6.0 }] }];
    for temperature in [0.0, 0.9] {
        let params = SamplingParams { temperature, top_p: None, seed: 5, max_new_tokens: 12 };
        let mut streamed = vec![(String::new(), Vec::new()); 2];
        let out = e
            .generate(&ids, &variants, &params, true, &Cancel::default(), &mut |r, text, steps| {
                streamed[r].0.push_str(text);
                streamed[r].1.extend_from_slice(steps);
                true
            })
            .unwrap();
        for (r, g) in out.iter().enumerate() {
            assert!(!g.tokens.is_empty());
            assert_eq!(g.steps.iter().map(|s| s.id).collect::<Vec<_>>(), g.tokens);
            assert_eq!(g.steps.iter().map(|s| s.text.as_str()).collect::<String>(), g.text, "step texts add up to the answer");
            assert_eq!(streamed[r], (g.text.clone(), g.steps.clone()), "the stream carries the same text and steps");
            // Each step against an independent forward pass of the whole sequence so far.
            let mut seq = ids.clone();
            for s in &g.steps {
                let l = logits(&e, &seq, &variants[r]);
                let max = l.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let z: f64 = l.iter().map(|&x| (x as f64 - max).exp()).sum();
                let p = |i: u32| (l[i as usize] as f64 - max).exp() / z;
                assert!((s.prob as f64 - p(s.id)).abs() < 1e-4, "p({}) = {} vs {}", s.id, s.prob, p(s.id));
                let mut order: Vec<u32> = (0..l.len() as u32).collect();
                order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
                assert_eq!(s.top.iter().map(|t| t.id).collect::<Vec<_>>(), order[..shared::STEP_TOP]);
                assert!(s.top.iter().all(|t| (t.prob as f64 - p(t.id)).abs() < 1e-4));
                assert_eq!(s.token, e.tok.token_text(s.id));
                if temperature == 0.0 {
                    assert_eq!(s.top[0].id, s.id, "greedy picks the most likely token");
                }
                seq.push(s.id);
            }
        }
    }
}

/// Samples batched in one request give each sample exactly what a request of its own (with seed
/// + i) gives, normal and steered, and stream each token with its sample's index.
#[test]
fn batched_samples_equal_separate_requests() {
    let t = tiny(&TinySpec { scale: 2.0, ..Default::default() });
    let e = load(&t.gguf);
    let req = shared::GenerateRequest {
        prompt: PromptSpec { text: "the cat".into(), chat: Some(true), messages: None },
        clamps: vec![shared::ClampSpec { layer: 2, neuron: 3, value: 6.0 }],
        sampling: SamplingParams { temperature: 0.9, top_p: Some(0.95), seed: 5, max_new_tokens: 20 },
        compare: true,
        stream: false,
        samples: 3,
    };
    let mut streamed = vec![String::new(); 6];
    let batch = e
        .generate_request(&req, &Cancel::default(), &mut |s, v, text, _| {
            streamed[2 * s + (v == shared::Variant::Steered) as usize].push_str(text);
            true
        })
        .unwrap();
    assert_eq!(batch.completions.len(), 6);
    for s in 0..3 {
        let one = shared::GenerateRequest { samples: 1, sampling: SamplingParams { seed: 5 + s as u64, ..req.sampling.clone() }, ..req.clone() };
        let alone = e.generate_request(&one, &Cancel::default(), &mut |_, _, _, _| true).unwrap();
        for (k, c) in alone.completions.iter().enumerate() {
            let b = &batch.completions[2 * s + k];
            assert_eq!((b.sample, b.variant), (s, c.variant));
            assert_eq!((&b.token_ids, &b.text), (&c.token_ids, &c.text), "sample {s} {:?}", c.variant);
            assert_eq!(streamed[2 * s + k], b.text);
        }
    }
    // Samples differ from one another (different seeds), and 9 samples are refused.
    assert_ne!(batch.completions[0].token_ids, batch.completions[2].token_ids);
    let too_many = shared::GenerateRequest { samples: 9, ..req.clone() };
    assert!(matches!(e.generate_work(&too_many), Err(Error::BadInput(_))));
    // A batch costs more than one sample (admission control counts it), less than separate
    // requests (the weights are read once per step for every row).
    let (three, one) = (e.generate_work(&req).unwrap(), e.generate_work(&shared::GenerateRequest { samples: 1, ..req }).unwrap());
    assert!(three > one && three < 3.0 * one, "{three} vs {one}");
}
