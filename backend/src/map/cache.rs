//! The on-disk neuron-map cache: a small binary format, written atomically (temporary file,
//! fsync, rename) and checked on load (magic, format version, the options it was built with,
//! exact length, CRC-32). Anything stale, truncated or corrupt is an `Error::Cache`: callers
//! rebuild, never trust it.
//!
//! Layout (little endian): `FLASHMAP` · u32 format · u32 header length · header (JSON `MapMeta`)
//! · for `pos` then `neg`: lse `[n]` f32, lse_top `[n]` f32, ids `[n·k]` u32, probs `[n·k]` f32
//! · moments: mean, std, skew, kurtosis `[n]` f32 each · u32 CRC-32 of everything before it.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{MapMeta, MomentTable, NeuronMap, PolarityTable};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FLASHMAP";
/// Bump when the layout or the meaning of any field changes.
pub const FORMAT_VERSION: u32 = 3;

/// Payload bytes of a map of `n` neurons with `k` tokens each.
pub fn payload_len(n: usize, k: usize) -> usize {
    2 * (8 * n + 8 * n * k) + 16 * n
}

fn cache_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Cache { path: path.to_owned(), message: message.into() }
}

/// Write `map` to `path` atomically.
pub fn save(map: &NeuronMap, path: &Path) -> Result<()> {
    let header = serde_json::to_vec(&map.meta).map_err(std::io::Error::other)?;
    let n = map.n_neurons();
    let k = map.meta.k;
    let mut buf: Vec<u8> = Vec::with_capacity(16 + header.len() + payload_len(n, k) + 4);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
    buf.extend_from_slice(&header);
    for t in [&map.pos, &map.neg] {
        t.lse.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        t.lse_top.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        t.ids.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        t.probs.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
    }
    let m = &map.moments;
    for col in [&m.mean, &m.std, &m.skew, &m.kurtosis] {
        col.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{seq}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(result?)
}

/// Read a map from `path`, accepting it only if it was built with exactly `expect`.
pub fn load(path: &Path, expect: &MapMeta) -> Result<NeuronMap> {
    let mut buf = Vec::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf)).map_err(|e| cache_err(path, format!("unreadable: {e}")))?;
    if buf.len() < 20 || &buf[..8] != MAGIC {
        return Err(cache_err(path, "not a neuron-map cache file"));
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
        return Err(cache_err(path, "checksum mismatch (truncated or corrupt)"));
    }
    let version = u32::from_le_bytes(body[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(cache_err(path, format!("format version {version}, expected {FORMAT_VERSION}")));
    }
    let hlen = u32::from_le_bytes(body[12..16].try_into().unwrap()) as usize;
    let header = body.get(16..16 + hlen).ok_or_else(|| cache_err(path, "truncated header"))?;
    let meta: MapMeta = serde_json::from_slice(header).map_err(|e| cache_err(path, format!("bad header: {e}")))?;
    if &meta != expect {
        return Err(cache_err(path, "stale: built for another model or other options"));
    }
    let n = meta.n_layers * meta.d_ff;
    let k = meta.k;
    let mut rest = &body[16 + hlen..];
    if rest.len() != payload_len(n, k) {
        return Err(cache_err(path, format!("payload is {} bytes, expected {}", rest.len(), payload_len(n, k))));
    }
    let mut f32s = |count: usize| -> Vec<f32> {
        let (a, b) = rest.split_at(count * 4);
        rest = b;
        a.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let mut tables = Vec::with_capacity(2);
    for _ in 0..2 {
        let lse = f32s(n);
        let lse_top = f32s(n);
        let ids: Vec<u32> = f32s(n * k).into_iter().map(f32::to_bits).collect();
        let probs = f32s(n * k);
        tables.push(PolarityTable { lse, lse_top, ids, probs });
    }
    let neg = tables.pop().unwrap();
    let pos = tables.pop().unwrap();
    let moments = MomentTable { mean: f32s(n), std: f32s(n), skew: f32s(n), kurtosis: f32s(n) };
    Ok(NeuronMap::new(meta, pos, neg, moments))
}

/// A content fingerprint of a model: sha256 of the file (or, for a directory, of its
/// config/tokenizer/safetensors files in name order). Files over 1 GiB are sampled (size, first
/// and last 64 MiB, and 64 evenly spaced 1 MiB pieces) so an 8B model is fingerprinted in a
/// second, not a minute.
pub fn fingerprint(path: &Path) -> Result<String> {
    let mut files: Vec<std::path::PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                n.ends_with(".safetensors") || n == "config.json" || n == "tokenizer.json" || n == "tokenizer_config.json"
            })
            .collect()
    } else {
        vec![path.to_owned()]
    };
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        hash_file(&f, &mut h)?;
    }
    Ok(hex::encode(h.finalize()))
}

fn hash_file(path: &Path, h: &mut Sha256) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    const BIG: u64 = 1 << 30;
    const EDGE: u64 = 64 << 20;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut read_range = |f: &mut std::fs::File, start: u64, count: u64, h: &mut Sha256| -> Result<()> {
        f.seek(SeekFrom::Start(start))?;
        let mut left = count;
        while left > 0 {
            let n = f.read(&mut buf[..left.min(1 << 20) as usize])?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(())
    };
    if len <= BIG {
        read_range(&mut f, 0, len, h)?;
    } else {
        read_range(&mut f, 0, EDGE, h)?;
        for i in 1..=64u64 {
            read_range(&mut f, len / 65 * i, 1 << 20, h)?;
        }
        read_range(&mut f, len - EDGE, EDGE, h)?;
    }
    Ok(())
}
