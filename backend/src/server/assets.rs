//! The web app's files compressed once, at their best (brotli 11, gzip 9), instead of on the fly
//! at every request: a cold first load moves less. Built in the background at start; until a
//! file is ready (or for a client that takes neither encoding) it is served as before.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// One file of `dist/`, compressed both ways, with a validator for conditional requests.
pub struct Asset {
    pub br: Vec<u8>,
    pub gzip: Vec<u8>,
    /// A strong ETag of the original bytes (the encodings carry their own suffix).
    pub etag: String,
    pub mime: String,
}

#[derive(Default)]
pub struct Assets {
    files: RwLock<HashMap<String, Arc<Asset>>>,
    /// Every file is compressed (part of the server's readiness).
    done: std::sync::atomic::AtomicBool,
}

/// Files worth compressing: text and WASM over 1 KiB (images and tiny files gain nothing).
pub(crate) fn worth(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(ext, "js" | "wasm" | "css" | "svg" | "json" | "txt") && std::fs::metadata(path).is_ok_and(|m| m.len() > 1024)
}

impl Assets {
    /// Whether [`Assets::build`] has finished.
    pub fn ready(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The compressed forms of `rel` (a path inside `dist/`), if ready.
    pub fn get(&self, rel: &str) -> Option<Arc<Asset>> {
        self.files.read().unwrap_or_else(|e| e.into_inner()).get(rel).cloned()
    }

    /// Compress every file of `dist` worth it (index.html is left out: it is tiny and small
    /// changes to it must show at once). Files are added one by one as they are done.
    pub fn build(&self, dist: &Path) {
        let mut stack = vec![dist.to_path_buf()];
        let mut found: Vec<PathBuf> = Vec::new();
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if worth(&p) {
                    found.push(p);
                }
            }
        }
        for p in found {
            let Ok(rel) = p.strip_prefix(dist) else { continue };
            let rel = rel.to_string_lossy().replace('\\', "/");
            match compress(&p) {
                Ok(a) => drop(self.files.write().unwrap_or_else(|e| e.into_inner()).insert(rel, Arc::new(a))),
                Err(e) => tracing::warn!("could not precompress {}: {e}", p.display()),
            }
        }
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

fn compress(path: &Path) -> std::io::Result<Asset> {
    let raw = std::fs::read(path)?;
    let mut br = Vec::with_capacity(raw.len() / 3);
    {
        let mut w = brotli::CompressorWriter::new(&mut br, 1 << 16, 11, 22);
        w.write_all(&raw)?;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(raw.len() / 3), flate2::Compression::best());
    gz.write_all(&raw)?;
    let gzip = gz.finish()?;
    let etag = format!("\"{:08x}-{:x}\"", crc32fast::hash(&raw), raw.len());
    let mime = actix_files::file_extension_to_mime(path.extension().and_then(|e| e.to_str()).unwrap_or("")).to_string();
    Ok(Asset { br, gzip, etag, mime })
}

/// Which encoding to send for an `Accept-Encoding` header: brotli, else gzip, else none. A
/// coding listed with `q=0` is refused; `*` stands for every coding not listed (RFC 9110
/// 12.5.3); names and `q` are case-insensitive.
pub fn pick(accept: &str) -> Option<&'static str> {
    let entries: Vec<(String, f32)> = accept
        .split(',')
        .filter_map(|part| {
            let mut it = part.split(';');
            let coding = it.next()?.trim().to_ascii_lowercase();
            let q = it
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())?;
            (!coding.is_empty()).then_some((coding, q))
        })
        .collect();
    let weight = |name: &str| entries.iter().find(|(c, _)| c == name).or_else(|| entries.iter().find(|(c, _)| c == "*")).map(|e| e.1);
    ["br", "gzip"].into_iter().find(|&name| weight(name).is_some_and(|q| q > 0.0))
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn accept_encoding_is_read_with_its_weights() {
        assert_eq!(pick("gzip, deflate, br, zstd"), Some("br"));
        assert_eq!(pick("gzip"), Some("gzip"));
        assert_eq!(pick("br;q=0, gzip;q=0.5"), Some("gzip"));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick(""), None);
        assert_eq!(pick("BR"), Some("br"));
        assert_eq!(pick("BR;Q=0, gzip"), Some("gzip"));
        assert_eq!(pick("*"), Some("br"));
        assert_eq!(pick("*, br;q=0"), Some("gzip"));
        assert_eq!(pick("gzip;q=0, *;q=0.1"), Some("br"));
        assert_eq!(pick("identity, *;q=0"), None);
        assert_eq!(pick("br;q=x, gzip"), Some("gzip"));
        assert_eq!(pick("br;q=é0"), None);
    }
}
