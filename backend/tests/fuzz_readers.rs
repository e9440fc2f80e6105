//! Property tests of the two readers that take bytes from disk: the GGUF model loader
//! (`Engine::load`) and the neuron-map cache (`map::cache::load`). Truncated, corrupt or random
//! input must give an `Err`: never a panic, and never a map other than the one saved. Bounded for
//! CI: a few hundred cases in all, seconds in release mode.
//!
//! What the random GGUF edits may touch. candle's reader (0.11) caps string and array lengths by
//! the bytes left in the file, so a corrupt length cannot make it allocate more than the file's
//! size. The engine once trusted some metadata values and tensor shapes (a head count of 0
//! divided by zero; a huge head size sized the RoPE tables; shape and offset arithmetic
//! overflowed; a larger d_ff let clamps index past the activations): this file found those, and
//! the engine now checks the settings (`Config::check`), every weight's shape against them, and
//! the size arithmetic. The regression tests at the end of this file keep them fixed. The random
//! edits still leave alone, to keep every case cheap and an abort out of the test binary:
//! - the whole metadata entries of `llama.attention.head_count`, `llama.rope.dimension_count` /
//!   `llama.attention.key_length` and `llama.embedding_length`;
//! - the tensor-info table, except the bytes of it that a separate property edits (names, dtypes,
//!   the low 2 bytes of each dimension, the low 4 of each offset).
//!
//! An edit that shifts the parse (a changed length prefix or value type) could in principle land
//! later values anywhere, but then every following key and tensor name is read from the wrong
//! place, and candle refuses the file long before the engine sees any value.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flash_interp::map::cache;
use flash_interp::map::{MapMeta, MomentTable, NeuronMap, PolarityTable};
use flash_interp::synthetic::{self, TinySpec};
use flash_interp::{Engine, LoadOptions};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use shared::View;

/// Bounded, and no regression files written into the repository.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, max_shrink_iters: 256, ..ProptestConfig::default() }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        return (*s).to_owned();
    }
    if let Some(s) = p.downcast_ref::<String>() {
        return s.clone();
    }
    "a panic without a message".to_owned()
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// The GGUF writer's (and reader's default) alignment of the tensor data.
const ALIGNMENT: usize = 32;
/// "The header/metadata region" that the head-only edits stay in.
const HEAD_BYTES: usize = 4096;
/// Metadata whose values the engine uses unchecked in ways that panic or abort (module comment).
const HAZARD_KEYS: [&str; 4] = ["llama.attention.head_count", "llama.attention.key_length", "llama.rope.dimension_count", "llama.embedding_length"];

/// How a load ended. The messages are only read through `Debug`, in failure messages.
#[allow(dead_code)]
#[derive(Debug)]
enum Outcome {
    Loaded,
    Refused(String),
    Panicked(String),
}

/// Write `bytes` to a fresh temporary file and load it as a model, catching any panic.
fn load_gguf_bytes(bytes: &[u8], opts: &LoadOptions) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fuzz.gguf");
    std::fs::write(&path, bytes).expect("write the test file");
    match catch_unwind(AssertUnwindSafe(|| Engine::load(&path, opts).map(|_| ()))) {
        Ok(Ok(())) => Outcome::Loaded,
        Ok(Err(e)) => Outcome::Refused(e.to_string()),
        Err(p) => Outcome::Panicked(panic_text(p)),
    }
}

/// One metadata entry: `entry` spans key, type and value; `value` the value alone.
struct Kv {
    key: String,
    ty: u32,
    entry: Range<usize>,
    value: Range<usize>,
}

/// One tensor-info entry, with the byte offset of each field.
struct TensorEntry {
    name: String,
    name_bytes: Range<usize>,
    dims_at: Vec<usize>,
    dims: Vec<u64>,
    dtype_at: usize,
    dtype: u32,
    offset_at: usize,
    offset: u64,
}

/// Where each field of a (valid) GGUF v2/v3 file is: an independent, minimal parser.
struct Layout {
    kvs: Vec<Kv>,
    tensors: Vec<TensorEntry>,
    /// The tensor-info table.
    table: Range<usize>,
    /// Where the tensor data starts.
    data_start: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let b: &'a [u8] = self.b;
        let s = &b[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    /// A length-prefixed string, and the range of its bytes (without the prefix).
    fn string(&mut self) -> (String, Range<usize>) {
        let n = self.u64() as usize;
        let start = self.pos;
        let s = String::from_utf8_lossy(self.take(n)).into_owned();
        (s, start..self.pos)
    }
    fn skip_value(&mut self, ty: u32) {
        match ty {
            0 | 1 | 7 => {
                self.take(1);
            }
            2 | 3 => {
                self.take(2);
            }
            4..=6 => {
                self.take(4);
            }
            10..=12 => {
                self.take(8);
            }
            8 => {
                self.string();
            }
            9 => {
                let item = self.u32();
                let n = self.u64();
                for _ in 0..n {
                    self.skip_value(item);
                }
            }
            other => panic!("unexpected GGUF value type {other}"),
        }
    }
}

impl Layout {
    fn parse(b: &[u8]) -> Layout {
        assert_eq!(&b[..4], b"GGUF", "not a GGUF file");
        let mut r = Reader { b, pos: 4 };
        let version = r.u32();
        assert!(version == 2 || version == 3, "GGUF version {version}: this parser reads v2 and v3 only");
        let n_tensors = r.u64() as usize;
        let n_kv = r.u64() as usize;
        let mut kvs = Vec::new();
        for _ in 0..n_kv {
            let start = r.pos;
            let (key, _) = r.string();
            let ty = r.u32();
            let value_start = r.pos;
            r.skip_value(ty);
            kvs.push(Kv { key, ty, entry: start..r.pos, value: value_start..r.pos });
        }
        let table_start = r.pos;
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let (name, name_bytes) = r.string();
            let n_dims = r.u32() as usize;
            let mut dims_at = Vec::new();
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims_at.push(r.pos);
                dims.push(r.u64());
            }
            let dtype_at = r.pos;
            let dtype = r.u32();
            let offset_at = r.pos;
            let offset = r.u64();
            tensors.push(TensorEntry { name, name_bytes, dims_at, dims, dtype_at, dtype, offset_at, offset });
        }
        let table = table_start..r.pos;
        let data_start = r.pos.div_ceil(ALIGNMENT) * ALIGNMENT;
        Layout { kvs, tensors, table, data_start }
    }

    fn kv(&self, key: &str) -> &Kv {
        self.kvs.iter().find(|kv| kv.key == key).unwrap_or_else(|| panic!("the tiny GGUF has no metadata {key}"))
    }

    fn tensor(&self, name: &str) -> &TensorEntry {
        self.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("the tiny GGUF has no tensor {name}"))
    }
}

impl TensorEntry {
    /// Bytes of data (the dtypes the tiny models use).
    fn data_bytes(&self) -> usize {
        let elems: u64 = self.dims.iter().product();
        let bytes = match self.dtype {
            0 => elems * 4,       // F32
            1 | 30 => elems * 2,  // F16, BF16
            8 => elems / 32 * 34, // Q8_0
            other => panic!("tensor {}: dtype {other} not handled by this test", self.name),
        };
        bytes as usize
    }
}

/// The tiny model's GGUF bytes and what the properties need to know about them.
struct Base {
    bytes: Vec<u8>,
    layout: Layout,
    /// Offsets random edits may overwrite: all but the hazards of the module comment.
    mutable: Vec<usize>,
    /// The same, within the first `HEAD_BYTES` (header and metadata).
    mutable_head: Vec<usize>,
    /// Offsets in the tensor-info table that cannot make the size arithmetic overflow.
    table_safe: Vec<usize>,
    /// End of the last tensor's data: any shorter file is truncated.
    required_len: usize,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        synthetic::write_gguf(&TinySpec { scale: 2.0, ..Default::default() }, &path).expect("write the tiny GGUF");
        let bytes = std::fs::read(path).expect("read the tiny GGUF back");
        let layout = Layout::parse(&bytes);
        for key in ["llama.attention.head_count", "llama.rope.dimension_count"] {
            layout.kv(key); // the protection below must protect something that exists
        }
        let mut hazards: Vec<Range<usize>> = vec![layout.table.clone()];
        hazards.extend(layout.kvs.iter().filter(|kv| HAZARD_KEYS.contains(&kv.key.as_str())).map(|kv| kv.entry.clone()));
        let mutable: Vec<usize> = (0..bytes.len()).filter(|i| !hazards.iter().any(|h| h.contains(i))).collect();
        let mutable_head: Vec<usize> = mutable.iter().copied().filter(|&i| i < HEAD_BYTES).collect();
        let mut table_safe = Vec::new();
        for t in &layout.tensors {
            table_safe.extend(t.name_bytes.clone());
            for &d in &t.dims_at {
                table_safe.extend(d..d + 2);
            }
            table_safe.extend(t.dtype_at..t.dtype_at + 4);
            table_safe.extend(t.offset_at..t.offset_at + 4);
        }
        let required_len =
            layout.tensors.iter().map(|t| layout.data_start + t.offset as usize + t.data_bytes()).max().expect("the tiny GGUF has tensors");
        assert!(required_len <= bytes.len(), "tensor data ends at {required_len}, past the file's {} bytes", bytes.len());
        assert!(!mutable_head.is_empty() && !table_safe.is_empty());
        Base { bytes, layout, mutable, mutable_head, table_safe, required_len }
    })
}

/// A byte to write: any, with the boundary values more often.
fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![4 => any::<u8>(), 1 => Just(0u8), 1 => Just(0xFFu8), 1 => Just(0x80u8), 1 => Just(1u8)]
}

/// 1-8 overwrites; each `Index` picks one of the allowed offsets.
fn edits() -> impl Strategy<Value = Vec<(Index, u8)>> {
    vec((any::<Index>(), byte()), 1..=8)
}

/// Apply `edits` at offsets drawn from `allowed`; returns the (offset, value) pairs, for messages.
fn apply(bytes: &mut [u8], allowed: &[usize], edits: &[(Index, u8)]) -> Vec<(usize, u8)> {
    edits
        .iter()
        .map(|(i, v)| {
            let at = *i.get(allowed);
            bytes[at] = *v;
            (at, *v)
        })
        .collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The start of a file: nothing, the magic, magic and version, or a whole small header.
fn gguf_prefix() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::<u8>::new()),
        Just(b"GGUF".to_vec()),
        (1u32..=3).prop_map(|v| cat(&[b"GGUF", &v.to_le_bytes()])),
        (2u32..=3, 0u64..4, 0u64..4).prop_map(|(v, t, k)| cat(&[b"GGUF", &v.to_le_bytes(), &t.to_le_bytes(), &k.to_le_bytes()])),
        (0u32..4, 0u32..4).prop_map(|(t, k)| cat(&[b"GGUF", &1u32.to_le_bytes(), &t.to_le_bytes(), &k.to_le_bytes()])),
    ]
}

/// The untouched tiny model loads: the properties below start from a valid file.
#[test]
fn gguf_base_file_loads() {
    let b = base();
    let out = load_gguf_bytes(&b.bytes, &LoadOptions::default());
    assert!(matches!(out, Outcome::Loaded), "{out:?}");
}

proptest! {
    #![proptest_config(config(96))]

    /// Every truncation short of the last tensor's end is refused; none panics.
    #[test]
    fn gguf_truncated_is_refused(at in any::<Index>(), in_head in any::<bool>()) {
        let b = base();
        let n = if in_head { at.index(HEAD_BYTES.min(b.bytes.len())) } else { at.index(b.bytes.len()) };
        let out = load_gguf_bytes(&b.bytes[..n], &LoadOptions::default());
        prop_assert!(!matches!(out, Outcome::Panicked(_)), "cut at {} of {}: {:?}", n, b.bytes.len(), out);
        if n < b.required_len {
            prop_assert!(matches!(out, Outcome::Refused(_)), "cut at {} of {}: {:?}", n, b.bytes.len(), out);
        }
    }

    /// Overwriting 1-8 bytes in the header/metadata or anywhere (hazards excepted) never panics.
    #[test]
    fn gguf_overwritten_bytes_never_panic(in_head in any::<bool>(), changes in edits()) {
        let b = base();
        let allowed = if in_head { &b.mutable_head } else { &b.mutable };
        let mut bytes = b.bytes.clone();
        let done = apply(&mut bytes, allowed, &changes);
        let out = load_gguf_bytes(&bytes, &LoadOptions::default());
        prop_assert!(!matches!(out, Outcome::Panicked(_)), "edits {:?}: {:?}", done, out);
    }

    /// Overwriting names, dtypes and low bytes of dims/offsets in the tensor-info table never panics.
    #[test]
    fn gguf_tensor_table_edits_never_panic(changes in edits()) {
        let b = base();
        let mut bytes = b.bytes.clone();
        let done = apply(&mut bytes, &b.table_safe, &changes);
        let out = load_gguf_bytes(&bytes, &LoadOptions::default());
        prop_assert!(!matches!(out, Outcome::Panicked(_)), "edits {:?}: {:?}", done, out);
    }

    /// Garbage appended after the last tensor never panics the loader.
    #[test]
    fn gguf_with_garbage_appended_never_panics(tail in vec(any::<u8>(), 1..512)) {
        let b = base();
        let bytes = cat(&[&b.bytes, &tail]);
        let out = load_gguf_bytes(&bytes, &LoadOptions::default());
        prop_assert!(!matches!(out, Outcome::Panicked(_)), "{} bytes appended: {:?}", tail.len(), out);
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Random bytes (bare, after a GGUF magic/version/header, or after a valid metadata prefix) are refused without a panic.
    #[test]
    fn gguf_random_bytes_are_refused(kind in 0u8..3, prefix in gguf_prefix(), cut in any::<Index>(), tail in vec(any::<u8>(), 0..4096)) {
        let b = base();
        // Kind 2 keeps a prefix of the real file cut before the tensor table (cutting inside the
        // table could complete its last entry with random dimensions: see the module comment).
        let bytes = match kind {
            0 => tail,
            1 => cat(&[&prefix, &tail]),
            _ => cat(&[&b.bytes[..cut.index(b.layout.table.start)], &tail]),
        };
        let out = load_gguf_bytes(&bytes, &LoadOptions::default());
        prop_assert!(matches!(out, Outcome::Refused(_)), "kind {} ({} bytes): {:?}", kind, bytes.len(), out);
    }
}

// ---------------------------------------------------------------------------------------------
// Neuron-map cache

fn finite() -> impl Strategy<Value = f32> {
    -1.0e6f32..1.0e6f32
}

fn table(n: usize, k: usize, vocab: usize) -> impl Strategy<Value = PolarityTable> {
    (vec(finite(), n), vec(finite(), n), vec(0..vocab as u32, n * k), vec(0.0f32..=1.0f32, n * k))
        .prop_map(|(lse, lse_top, ids, probs)| PolarityTable { lse, lse_top, ids, probs })
}

/// A small map (up to 3 layers x 4 neurons, k up to 5, vocabulary up to 12) of finite values.
fn neuron_map() -> impl Strategy<Value = NeuronMap> {
    let metas = (
        (1usize..=3, 1usize..=4, 1usize..=5, 1usize..=12),
        "[0-9a-f]{0,64}",
        0usize..3,
        any::<bool>(),
        prop::sample::select(vec!["f32", "f16", "bf16", "quantized"]),
    )
        .prop_map(|((n_layers, d_ff, k, vocab), fingerprint, view, final_norm, weights)| MapMeta {
            model_fingerprint: fingerprint,
            view: View::ALL[view],
            final_norm,
            k,
            weights: weights.to_owned(),
            n_layers,
            d_ff,
            vocab,
        });
    metas
        .prop_flat_map(|meta| {
            let (n, k, vocab) = (meta.n_layers * meta.d_ff, meta.k, meta.vocab);
            let col = || prop::collection::vec(-1e6f32..1e6, n);
            (Just(meta), table(n, k, vocab), table(n, k, vocab), (col(), col(), col(), col()))
        })
        .prop_map(|(meta, pos, neg, (mean, std, skew, kurtosis))| NeuronMap::new(meta, pos, neg, MomentTable { mean, std, skew, kurtosis }))
}

/// Save `map` into a fresh temporary directory (kept alive by the returned handle).
fn saved(map: &NeuronMap) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("map.fimap");
    cache::save(map, &path).expect("save the map");
    (dir, path)
}

/// `cache::load`, with a panic turned into `Err(message)`.
fn load_map(path: &Path, expect: &MapMeta) -> Result<flash_interp::Result<NeuronMap>, String> {
    catch_unwind(AssertUnwindSafe(|| cache::load(path, expect))).map_err(panic_text)
}

fn other_view(v: View) -> View {
    match v {
        View::Up => View::Gate,
        View::Gate => View::Down,
        View::Down => View::Up,
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// A saved map loads back equal under its own meta.
    #[test]
    fn map_cache_round_trips(map in neuron_map()) {
        let (_dir, path) = saved(&map);
        let back = load_map(&path, &map.meta)
            .map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?
            .map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
        prop_assert_eq!(back, map);
    }

    /// Every truncation of a saved map is refused without a panic.
    #[test]
    fn map_cache_truncated_is_refused(map in neuron_map(), cut in any::<Index>()) {
        let (_dir, path) = saved(&map);
        let bytes = std::fs::read(&path).unwrap();
        let n = cut.index(bytes.len());
        std::fs::write(&path, &bytes[..n]).unwrap();
        let out = load_map(&path, &map.meta).map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
        prop_assert!(out.is_err(), "cut at {} of {} loaded", n, bytes.len());
    }

    /// Bytes appended to a saved map make it refused without a panic.
    #[test]
    fn map_cache_with_garbage_appended_is_refused(map in neuron_map(), tail in vec(any::<u8>(), 1..64)) {
        let (_dir, path) = saved(&map);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, cat(&[&bytes, &tail])).unwrap();
        let out = load_map(&path, &map.meta).map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
        prop_assert!(out.is_err(), "{} bytes appended and it loaded", tail.len());
    }

    /// A map loaded under any other expected meta (model, view, options or shape) is refused as a cache error.
    #[test]
    fn map_cache_refuses_other_meta(map in neuron_map(), which in 0usize..8) {
        let mut other = map.meta.clone();
        match which {
            0 => other.model_fingerprint.push('0'),
            1 => other.view = other_view(other.view),
            2 => other.final_norm = !other.final_norm,
            3 => other.k += 1,
            4 => other.weights.push_str("-other"),
            5 => other.n_layers += 1,
            6 => other.d_ff += 1,
            _ => other.vocab += 1,
        }
        let (_dir, path) = saved(&map);
        let out = load_map(&path, &other).map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
        prop_assert!(matches!(out, Err(flash_interp::Error::Cache { .. })), "{:?}", out.map(|m| m.meta));
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// Flipping 1-8 bytes gives an Err (always, for one byte: CRC-32), or at worst the same map; never a panic.
    #[test]
    fn map_cache_corruption_is_detected(map in neuron_map(), flips in vec((any::<Index>(), 1u8..=255), 1..=8)) {
        let (_dir, path) = saved(&map);
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, mask) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= *mask;
        }
        std::fs::write(&path, bytes).unwrap();
        match load_map(&path, &map.meta) {
            Err(p) => return Err(TestCaseError::fail(format!("panicked: {p}"))),
            Ok(Err(_)) => {}
            Ok(Ok(m)) => {
                // Only flips that cancel out (the same byte and mask twice) can leave the file valid.
                prop_assert!(flips.len() > 1, "a one-byte change went undetected");
                prop_assert_eq!(m, map);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Random files, with or without magic, version, header and a valid CRC, never panic the cache reader.
    #[test]
    fn map_cache_random_files_never_panic(
        map in neuron_map(),
        kind in 0u8..4,
        version in prop_oneof![Just(cache::FORMAT_VERSION), any::<u32>()],
        hlen_delta in -3i64..=3,
        body in vec(any::<u8>(), 0..256),
        fix_crc in any::<bool>(),
    ) {
        let expect = &map.meta;
        let header = serde_json::to_vec(expect).unwrap();
        let n = expect.n_layers * expect.d_ff;
        let payload_len = cache::payload_len(n, expect.k);
        let hlen = (header.len() as i64 + hlen_delta).max(0) as u32;
        let mut bytes = match kind {
            0 => body,
            1 => cat(&[b"FLASHMAP", &version.to_le_bytes(), &(body.len() as u32).to_le_bytes(), &body]),
            2 => cat(&[b"FLASHMAP", &version.to_le_bytes(), &hlen.to_le_bytes(), &header, &body]),
            // A real header and a payload of exactly the right size, of random bytes.
            _ => {
                let payload: Vec<u8> = (0..payload_len).map(|i| if body.is_empty() { 0 } else { body[i % body.len()] }).collect();
                cat(&[b"FLASHMAP", &version.to_le_bytes(), &hlen.to_le_bytes(), &header, &payload])
            }
        };
        if fix_crc {
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("random.fimap");
        std::fs::write(&path, bytes).unwrap();
        let out = load_map(&path, expect).map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
        if let Ok(m) = &out {
            prop_assert_eq!(&m.meta, expect);
            for t in [&m.pos, &m.neg] {
                prop_assert_eq!((t.lse.len(), t.lse_top.len(), t.ids.len(), t.probs.len()), (n, n, n * expect.k, n * expect.k));
            }
        }
        if kind == 3 && version == cache::FORMAT_VERSION && hlen_delta == 0 && fix_crc {
            prop_assert!(out.is_ok(), "a well-formed file was refused: {:?}", out.err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Known bugs found while writing the properties above: each test says what should happen and is
// ignored until the code does it (`cargo test --test fuzz_readers -- --ignored` runs them).

/// The tiny model's bytes with one edit.
fn edited(edit: impl FnOnce(&Layout, &mut [u8])) -> Vec<u8> {
    let b = base();
    let mut bytes = b.bytes.clone();
    edit(&b.layout, bytes.as_mut_slice());
    bytes
}

fn set_meta_u32(layout: &Layout, bytes: &mut [u8], key: &str, value: u32) {
    let kv = layout.kv(key);
    assert_eq!(kv.ty, 4, "{key} is not stored as a u32");
    bytes[kv.value.clone()].copy_from_slice(&value.to_le_bytes());
}

/// A GGUF v3 file from parts: u32 or string metadata, and tensor infos `(name, dims, dtype, offset)`.
fn gguf_file(kvs: &[(&str, Result<u32, &str>)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    let mut b = cat(&[b"GGUF", &3u32.to_le_bytes(), &(tensors.len() as u64).to_le_bytes(), &(kvs.len() as u64).to_le_bytes()]);
    for (key, value) in kvs {
        put_str(&mut b, key);
        match value {
            Ok(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Err(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut b, s);
            }
        }
    }
    for (name, dims, dtype, offset) in tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims.iter() {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&dtype.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    b.extend_from_slice(data);
    b
}

/// `llama.attention.head_count = 0` is refused, not a division by zero.
#[test]

fn gguf_zero_heads_is_refused() {
    let bytes = edited(|l, b| set_meta_u32(l, b, "llama.attention.head_count", 0));
    let out = load_gguf_bytes(&bytes, &LoadOptions::default());
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
}

/// `general.alignment = 0` is refused, not a division by zero.
#[test]

fn gguf_zero_alignment_is_refused() {
    let bytes = gguf_file(&[("general.alignment", Ok(0))], &[], &[]);
    let out = load_gguf_bytes(&bytes, &LoadOptions::default());
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
}

/// A tensor whose byte size overflows `usize` is refused, not a panic (nor a wrapped size that passes the bounds check).
#[test]
fn gguf_tensor_size_overflow_is_refused() {
    // 2^62 + 32 f32 values: 2^64 + 128 bytes, which wraps to exactly the real tensor's 128.
    let bytes = edited(|l, b| {
        let at = l.tensor("output_norm.weight").dims_at[0];
        b[at..at + 8].copy_from_slice(&((1u64 << 62) + 32).to_le_bytes());
    });
    let out = load_gguf_bytes(&bytes, &LoadOptions::default());
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
}

/// A rank-0 `token_embd.weight` is refused, not an index-out-of-bounds panic.
#[test]
fn gguf_rank0_embedding_is_refused() {
    let no_dims: &[u64] = &[];
    let bytes = gguf_file(
        &[("general.architecture", Err("llama")), ("llama.attention.head_count", Ok(4)), ("llama.embedding_length", Ok(32))],
        &[("token_embd.weight", no_dims, 0, 0)],
        &1.0f32.to_le_bytes(),
    );
    let out = load_gguf_bytes(&bytes, &LoadOptions::default());
    assert!(matches!(out, Outcome::Refused(_)), "{out:?}");
}

/// Shape metadata that disagrees with the weights (d_ff, d_model, heads, head size) is refused at load.
#[test]
fn gguf_shape_metadata_disagreeing_with_weights_is_refused() {
    // max_context 16 keeps the RoPE tables of the large head size small (16 x 2^19 floats).
    let opts = LoadOptions { max_context: 16, ..LoadOptions::default() };
    let mut loaded = Vec::new();
    for (key, value) in [
        ("llama.feed_forward_length", 65),
        ("llama.embedding_length", 48),
        ("llama.attention.head_count", 8),
        ("llama.rope.dimension_count", 1 << 20),
    ] {
        let bytes = edited(|l, b| set_meta_u32(l, b, key, value));
        let out = load_gguf_bytes(&bytes, &opts);
        if !matches!(out, Outcome::Refused(_)) {
            loaded.push((key, value, out));
        }
    }
    assert!(loaded.is_empty(), "not refused: {loaded:?}");
}

/// On a model with no layers, an out-of-range layer is an error, not an arithmetic underflow.
#[test]
fn zero_layer_model_range_errors_do_not_underflow() {
    let bytes = edited(|l, b| set_meta_u32(l, b, "llama.block_count", 0));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, bytes).unwrap();
    // Refusing such a model at load would be a fix too.
    let Ok(engine) = Engine::load(&path, &LoadOptions::default()) else { return };
    let r = catch_unwind(AssertUnwindSafe(|| flash_interp::limits::check_layer_neuron(0, 0, engine.config()).is_err()));
    assert_eq!(r.map_err(panic_text), Ok(true));
}

// ---------------------------------------------------------------------------------------------
// safetensors (our own header reader: the weights are read tensor by tensor, not mapped)

/// A tiny Hugging Face directory's files, written once.
fn hf_base() -> &'static Vec<(String, Vec<u8>)> {
    static BASE: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        synthetic::write_hf_dir(&TinySpec::default(), dir.path()).unwrap();
        ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(dir.path().join(f)).unwrap()))
            .collect()
    })
}

/// Load the tiny directory with `model.safetensors` replaced by `bytes`, catching any panic.
fn load_safetensors_bytes(bytes: &[u8]) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, b) in hf_base() {
        std::fs::write(dir.path().join(name), if name == "model.safetensors" { bytes } else { b }).unwrap();
    }
    match catch_unwind(AssertUnwindSafe(|| Engine::load(dir.path(), &LoadOptions::default()).map(|_| ()))) {
        Ok(Ok(())) => Outcome::Loaded,
        Ok(Err(e)) => Outcome::Refused(e.to_string()),
        Err(p) => Outcome::Panicked(panic_text(p)),
    }
}

fn safetensors_file() -> &'static [u8] {
    &hf_base().iter().find(|(n, _)| n == "model.safetensors").unwrap().1
}

proptest! {
    #![proptest_config(config(96))]

    /// Every truncation is refused (each tensor must lie inside the file); none panics.
    #[test]
    fn safetensors_truncated_is_refused(at in any::<Index>()) {
        let b = safetensors_file();
        let n = at.index(b.len());
        let out = load_safetensors_bytes(&b[..n]);
        prop_assert!(matches!(out, Outcome::Refused(_)), "cut at {} of {}: {:?}", n, b.len(), out);
    }

    /// Overwriting 1-8 bytes of the length prefix and JSON header (shapes, dtypes, offsets) never
    /// panics; a load that succeeds read a consistent file.
    #[test]
    fn safetensors_header_edits_never_panic(changes in edits()) {
        let mut bytes = safetensors_file().to_vec();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let allowed: Vec<usize> = (0..header_end).collect();
        let done = apply(&mut bytes, &allowed, &changes);
        let out = load_safetensors_bytes(&bytes);
        prop_assert!(!matches!(out, Outcome::Panicked(_)), "edits {:?}: {:?}", done, out);
    }
}
