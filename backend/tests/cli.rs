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

/// A byte piece is typed as the commands print it (`\xC3`, one backslash), and printed back so.
#[test]
fn byte_pieces_are_printed_as_they_are_typed() {
    let (_d, m) = tiny();
    let (ok, out, err) = run(&["--model", &m, "sweep", "-p", "the cat", "--layer", "1", "--neuron", "3", "--target", "\\xC3", "--values", "0:1:2"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("p(\"\\xC3\") unclamped"), "{out}");
    let (ok, _, err) =
        run(&["--model", &m, "sweep", "-p", "the cat", "--layer", "1", "--neuron", "3", "--target", "\\xC3\\xA9", "--values", "0:1:2"]);
    assert!(!ok && err.contains("no single token stands for them"), "{err}");
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
        (vec!["--model", "/nonexistent/model.gguf", "next-token", "-p", "x"], "no such file or directory (nor a known model name"),
        (vec!["fetch-model", "gemma-9"], "no model is known as \"gemma-9\"; known: smollm2-135m-instruct, gemma-3-270m"),
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

/// The container's start-up without a container (no image registry is reachable where CI runs):
/// the runtime stage's `ENV` lines and `ENTRYPOINT` from the Dockerfile, with its paths moved to
/// temporary directories and a tiny model in place of the default one. The server must come up,
/// serve the app, become ready once its maps are built, and stop cleanly on SIGTERM.
#[test]
fn dockerfile_start_up_serves_becomes_ready_and_stops_on_sigterm() {
    use std::io::{Read, Write};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap().replace("\\\n", " ");
    let env_line = runtime.lines().find(|l| l.starts_with("ENV ")).expect("an ENV line in the runtime stage");
    let entry = runtime.lines().find(|l| l.starts_with("ENTRYPOINT ")).expect("an ENTRYPOINT");
    assert_eq!(entry.trim(), r#"ENTRYPOINT ["flash-interp", "serve"]"#);

    let (_d, model) = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(dist.join("index.html"), "<html>APP</html>").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = bin();
    cmd.arg("serve").env_remove("FLASH_INTERP_MODEL");
    for kv in env_line["ENV ".len()..].split_whitespace() {
        let (k, v) = kv.split_once('=').unwrap();
        let v = match k {
            "FLASH_INTERP_MODEL" => model.clone(),
            "FLASH_INTERP_PORT" => port.to_string(),
            "FLASH_INTERP_DIST" => dist.to_string_lossy().into_owned(),
            _ => v.replace("/app", &tmp.path().join("app").to_string_lossy()).replace("/data", &tmp.path().join("data").to_string_lossy()),
        };
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let start = std::time::Instant::now();
    let ready = loop {
        match get("/readyz") {
            Some(r) if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") => break r,
            _ if start.elapsed().as_secs() > 60 => {
                let _ = child.kill();
                panic!("not ready after 60 s");
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    assert!(ready.contains("\"ready\":true"), "{ready}");
    assert!(get("/neuron/1/2").unwrap().contains("<html>APP</html>"), "the app's deep link is served");
    assert!(tmp.path().join("data/cache").read_dir().unwrap().count() >= 3, "the maps are cached in the volume");
    // SIGTERM: a graceful stop, promptly (nothing is running).
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed().as_secs() < 15, "still running 15 s after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}
