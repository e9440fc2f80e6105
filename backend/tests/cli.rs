//! The `flash-interp` binary, black box: JSON output decodes into the shared types, and bad
//! input is one clear line on stderr with a non-zero exit, never a panic.

use std::process::Command;

use flash_interp::synthetic::{self, TinySpec};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flash-interp"))
}

fn tiny() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    synthetic::write_gguf(&TinySpec { scale: 2.0, ..Default::default() }, &p).unwrap();
    let s = p.to_string_lossy().into_owned();
    (dir, s)
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).env_remove("FLASH_INTERP_MODEL").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn json_outputs_decode_into_shared_types() {
    let (_d, m) = tiny();
    let (ok, out, err) = run(&["--model", &m, "--json", "next-token", "-p", "the cat", "--top-k", "3"]);
    assert!(ok, "{err}");
    let r: shared::NextTokenResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(r.top.len(), 3);

    let (ok, out, err) = run(&["--model", &m, "--json", "generate", "-p", "the cat", "--clamp", "1:3:9", "--compare", "--max-tokens", "8"]);
    assert!(ok, "{err}");
    let r: shared::GenerateResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(r.completions.len(), 2);
    assert_eq!(r.completions[0].variant, shared::Variant::Normal);
    assert_eq!(r.completions[1].variant, shared::Variant::Steered);

    let (ok, out, err) =
        run(&["--model", &m, "--json", "sweep", "-p", "the cat", "--layer", "1", "--neuron", "3", "--target", " the", "--values", "-5:5:5"]);
    assert!(ok, "{err}");
    let r: shared::SweepResponse = serde_json::from_str(&out).unwrap();
    assert_eq!(r.points.iter().map(|p| p.value).collect::<Vec<_>>(), vec![-5.0, -2.5, 0.0, 2.5, 5.0]);
}

#[test]
fn compare_prints_two_columns() {
    let (_d, m) = tiny();
    let (ok, out, err) = run(&["--model", &m, "generate", "-p", "the cat", "--clamp", "2:7:-9", "--compare", "--max-tokens", "6"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    assert!(header.starts_with("normal") && header.contains("│ steered (2:7:-9)"), "{out}");
}

#[test]
fn bad_input_is_one_line_and_a_failure() {
    let (_d, m) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, "not a model").unwrap();
    let junk = junk.to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", &m, "generate", "-p", "x", "--clamp", "9:0:1"], "layer 9 is out of range"),
        (vec!["--model", &m, "generate", "-p", "x", "--clamp", "0:999:1"], "neuron 999 is out of range"),
        (vec!["--model", &m, "generate", "-p", "x", "--clamp", "0:1:NaN"], "not a finite"),
        (vec!["--model", &m, "generate", "-p", "x", "--clamp", "0:1:inf"], "not a finite"),
        (vec!["--model", &m, "generate", "-p", "", "--no-chat"], "empty"),
        (vec!["--model", &m, "sweep", "-p", "x", "--layer", "0", "--neuron", "0", "--target", "the cat"], "not a single token"),
        (vec!["--model", &junk, "next-token", "-p", "x"], "not a readable GGUF"),
        (vec!["--model", "/nonexistent/model.gguf", "next-token", "-p", "x"], "No such file"),
    ];
    for (args, want) in cases {
        let (ok, out, err) = run(&args);
        assert!(!ok, "{args:?} should fail; stdout {out}");
        assert!(err.contains(want), "{args:?}: stderr {err:?}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // A corrupt model (a NaN norm weight) is refused at load with one line naming the tensor.
    let nan = dir.path().join("nan.gguf");
    synthetic::write_gguf(&TinySpec::default(), &nan).unwrap();
    synthetic::overwrite_f32(&nan, "blk.0.ffn_norm.weight", f32::NAN).unwrap();
    let (ok, _, err) = run(&["--model", &nan.to_string_lossy(), "next-token", "-p", "x"]);
    assert!(!ok && err.trim().lines().count() == 1 && err.contains("blk.0.ffn_norm.weight has NaN or infinite values"), "{err}");
    // Temperatures too small for a naive softmax are valid, and greedy.
    let greedy = run(&["--model", &m, "--json", "generate", "-p", "the cat", "--max-tokens", "6"]);
    let tiny_t = run(&["--model", &m, "--json", "generate", "-p", "the cat", "--max-tokens", "6", "--temperature", "1e-38"]);
    assert!(greedy.0 && tiny_t.0, "{}", tiny_t.2);
    let text = |out: &str| serde_json::from_str::<shared::GenerateResponse>(out).unwrap().completions[0].text.clone();
    assert_eq!(text(&greedy.1), text(&tiny_t.1));
    // With --json, the error is an ApiError on stdout.
    let (ok, out, _) = run(&["--model", &m, "--json", "generate", "-p", "x", "--clamp", "9:0:1"]);
    assert!(!ok);
    let e: shared::ApiError = serde_json::from_str(&out).unwrap();
    assert_eq!(e.code, "bad_input");
}
