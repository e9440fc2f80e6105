//! Tokenizers: built from GGUF metadata (byte-level BPE from `tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges`, with the model's pre-tokenizer rules) or read from tokenizer.json.
//!
//! candle's own GGUF tokenizer falls back to GPT-2 defaults for SmolLM2 (pre = "smollm") and adds a
//! leading space, so we build the `tokenizers::Tokenizer` ourselves.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// Llama 3's pre-tokenizer regex (llama.cpp's "llama-bpe").
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Where [`Tok::decode_step`] is in a growing token sequence: the window it decodes starts at
/// `prefix` (context for the tokens after `read`, which are new).
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    prefix: usize,
    read: usize,
}

/// A tokenizer plus what the model wants around it (BOS, end-of-sequence ids).
#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    pub bos_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    /// Prepend BOS to plain-text prompts.
    pub add_bos: bool,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    meta(c, key).and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|x| x as u32)))
}

impl Tok {
    /// Build the tokenizer stored in GGUF metadata.
    pub fn from_gguf(c: &Content) -> Result<Self> {
        let model = meta(c, "tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned();
        if !matches!(model.as_deref(), Some("gpt2" | "llama")) {
            return Err(Error::Tokenizer(format!(
                "only byte-level BPE (tokenizer.ggml.model = \"gpt2\") and SentencePiece-style (\"llama\") GGUF tokenizers are supported, found {model:?}"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let v = meta(c, key).ok_or_else(|| Error::Tokenizer(format!("missing {key}")))?;
            v.to_vec()
                .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))?
                .iter()
                .map(|x| x.to_string().cloned().map_err(|e| Error::Tokenizer(format!("{key}: {e}"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match meta(c, "tokenizer.ggml.token_type") {
            Some(v) => v.to_vec().map_err(|e| Error::Tokenizer(e.to_string()))?.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let mut tk = if model.as_deref() == Some("llama") {
            let scores: Vec<f32> = match meta(c, "tokenizer.ggml.scores") {
                Some(v) => v.to_vec().map_err(|e| Error::Tokenizer(e.to_string()))?.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect(),
                None => return Err(Error::Tokenizer("missing tokenizer.ggml.scores".into())),
            };
            let space_prefix = meta(c, "tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
            let unk = meta_u32(c, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize).cloned());
            sentencepiece(&tokens, &scores, &types, unk, space_prefix)?
        } else {
            byte_level(c, &tokens)?
        };
        // Control (3) and user-defined (4) tokens are matched whole in the input text.
        let specials: Vec<AddedToken> =
            tokens.iter().zip(&types).filter(|(_, &ty)| ty == 3 || ty == 4).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
        tk.add_special_tokens(specials).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let bos_id = meta_u32(c, "tokenizer.ggml.bos_token_id");
        let eos_id = meta_u32(c, "tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        // Gemma's chat turns end with <end_of_turn>, which its base GGUFs do not name.
        let eot = meta_u32(c, "tokenizer.ggml.eot_token_id").or_else(|| tokens.iter().position(|t| t == "<end_of_turn>").map(|i| i as u32));
        eos_ids.extend(eot.filter(|e| !eos_ids.contains(e)));
        let add_bos = meta(c, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self { bos_token: name(bos_id), eos_token: name(eos_id), inner: tk, bos_id, eos_ids, add_bos })
    }

    /// Read tokenizer.json (and tokenizer_config.json / config.json for BOS and EOS) from a directory.
    pub fn from_hf_dir(dir: &Path, eos_from_config: &[u32]) -> Result<Self> {
        let inner = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
        let cfg: serde_json::Value =
            std::fs::read(dir.join("tokenizer_config.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(serde_json::Value::Null);
        let token_str = |key: &str| -> Option<String> {
            match &cfg[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token");
        let eos_token = token_str("eos_token");
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos_ids: Vec<u32> = eos_token.as_deref().and_then(|t| inner.token_to_id(t)).into_iter().collect();
        for &e in eos_from_config {
            if !eos_ids.contains(&e) {
                eos_ids.push(e);
            }
        }
        // Does the tokenizer's post-processor add BOS to plain text?
        let with = inner.encode("a", true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let without = inner.encode("a", false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let add_bos = match cfg["add_bos_token"].as_bool() {
            Some(b) => b,
            None => with.get_ids().len() > without.get_ids().len(),
        };
        Ok(Self { inner, bos_id, eos_ids, add_bos, bos_token, eos_token })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` as it is (special tokens written in it are matched whole), no BOS.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
    }

    /// Token ids of a plain-text prompt, with BOS if the model wants one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend(self.encode_raw(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text `tokens` (a growing sequence, all of it so far) adds since the last call on
    /// `stream`, decoding only a short window (the prefix/read offsets of Hugging Face's
    /// text-generation-inference) rather than the whole sequence at every token. Empty while the
    /// newest bytes do not yet complete a character.
    pub fn decode_step(&self, stream: &mut TextStream, tokens: &[u32]) -> Result<String> {
        let before = self.decode(&tokens[stream.prefix..stream.read])?;
        let now = self.decode(&tokens[stream.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            stream.prefix = stream.read;
            stream.read = tokens.len();
            return Ok(now[before.len()..].to_owned());
        }
        Ok(String::new())
    }

    /// The text of a single token, as it reads in output (" dog", "\n", "<|im_end|>"), written so
    /// that [`Tok::single_token`] reads it back as this token. A token that is part of a
    /// character (a byte-level piece such as Ġâ) has its incomplete bytes written `\xE2`, so
    /// different pieces do not all read "�"; a byte token (SentencePiece's `<0x41>` fallback) is
    /// written as its byte where its character names another token (the piece "A"); a backslash
    /// that would read as such an escape is written `\x5C` (a code token `\xff`).
    pub fn token_text(&self, id: u32) -> String {
        let text = self.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"));
        if !self.byte_level() {
            if let Some(b) = self.inner.id_to_token(id).and_then(|p| byte_piece(&p)) {
                if self.encode_raw(&text).ok().as_deref() != Some(&[id]) {
                    return format!("\\x{b:02X}");
                }
            }
        }
        if text.contains('\u{FFFD}') {
            if let Some(bytes) = self.token_bytes(id) {
                return escape_bytes(&bytes);
            }
        }
        if unescape_bytes(&text).is_some() {
            return escape_bytes(text.as_bytes());
        }
        text
    }

    /// The bytes a token stands for, where its piece says: any piece of a byte-level BPE (each
    /// character one byte of GPT-2's table), or a byte token (`<0xE2>`) of other tokenizers. None
    /// for the rest (special tokens, SentencePiece pieces), whose decoded text is what they are.
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        if self.byte_level() {
            piece.chars().map(unicode_byte).collect()
        } else {
            byte_piece(&piece).map(|b| vec![b])
        }
    }

    /// Does the tokenizer decode byte-level pieces (GPT-2's table)?
    fn byte_level(&self) -> bool {
        use tokenizers::DecoderWrapper;
        match self.inner.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(s)) => s.get_decoders().iter().any(|d| matches!(d, DecoderWrapper::ByteLevel(_))),
            _ => false,
        }
    }

    /// The token that text with `\xNN` escapes names, written as [`Tok::token_text`] shows it
    /// (" \xE2", "\x41", "\x5Cxff"), read into its `bytes`: the token of exactly those bytes,
    /// else the single token of the text they make.
    fn unescaped_token(&self, bytes: &[u8]) -> Option<u32> {
        self.bytes_token(bytes).or_else(|| match self.encode_raw(std::str::from_utf8(bytes).ok()?).ok()?.as_slice() {
            &[id] => Some(id),
            _ => None,
        })
    }

    /// The token that stands for exactly `bytes`, if there is one.
    fn bytes_token(&self, bytes: &[u8]) -> Option<u32> {
        let id = if self.byte_level() {
            self.inner.token_to_id(&bytes.iter().map(|&b| bytes_to_unicode()[b as usize]).collect::<String>())
        } else if let [b] = bytes {
            self.inner.token_to_id(&format!("<0x{b:02X}>"))
        } else {
            None
        }?;
        (self.token_bytes(id).as_deref() == Some(bytes)).then_some(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token that `text` names alone, as [`Tok::single_token`] reads it: escapes first, then
    /// the text's tokenization if it is one token, then the vocabulary's piece of exactly that
    /// text.
    pub fn whole_token(&self, text: &str) -> Option<u32> {
        if let Some(bytes) = unescape_bytes(text) {
            return self.unescaped_token(&bytes);
        }
        match *self.encode_raw(text).ok()?.as_slice() {
            // A tokenizer that adds a leading space reads "dog" as the piece " dog": the piece
            // whose text is "dog" (within a word) is the one this text names.
            [id] if self.token_text(id) != text => self.vocab_token(text).or(Some(id)),
            [id] => Some(id),
            _ => self.vocab_token(text),
        }
    }

    /// The token whose text ([`Tok::token_text`]) is exactly `text` although tokenizing the text
    /// does not give it: a piece that SentencePiece's merges never make (Gemma's " YYYY"), which
    /// the map still decodes and the model can still write.
    fn vocab_token(&self, text: &str) -> Option<u32> {
        let id = if self.byte_level() { self.bytes_token(text.as_bytes()) } else { self.inner.token_to_id(&text.replace(' ', "▁")) }?;
        (self.token_text(id) == text).then_some(id)
    }

    /// `text` must be exactly one token ([`Tok::whole_token`]): its id, or an error that shows
    /// how it tokenizes and suggests single-token variants.
    pub fn single_token(&self, text: &str) -> Result<u32> {
        if let Some(id) = self.whole_token(text) {
            return Ok(id);
        }
        // Escapes first, so that every token's text reads back as it (a code token `\xff` is
        // written `\x5Cxff`).
        if let Some(bytes) = unescape_bytes(text) {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
            return Err(Error::UnknownToken(format!("{} is the bytes {}, and no single token stands for them", quoted(text), hex.join(" "))));
        }
        let ids = self.encode_raw(text)?;
        let pieces: Vec<String> = ids.iter().map(|&i| quoted(&self.token_text(i))).collect();
        let base = text.trim();
        let mut cands = vec![format!(" {base}"), base.to_owned()];
        let mut chars = base.chars();
        if let Some(f) = chars.next() {
            let cap: String = f.to_uppercase().chain(chars).collect();
            cands.push(format!(" {cap}"));
            cands.push(cap);
        }
        cands.push(format!(" {}", base.to_lowercase()));
        cands.push(format!(" {base}s"));
        let mut ok: Vec<String> = Vec::new();
        for c in cands {
            if c != text && !ok.contains(&quoted(&c)) && self.whole_token(&c).is_some() {
                ok.push(quoted(&c));
            }
        }
        let how = if ids.is_empty() { "no tokens".to_owned() } else { format!("{} tokens [{}]", ids.len(), pieces.join(", ")) };
        let hint = if ok.is_empty() { String::new() } else { format!("; single-token variants: {}", ok.join(", ")) };
        Err(Error::UnknownToken(format!("{} is not a single token: it tokenizes as {how}{hint}", quoted(text))))
    }
}

/// GPT-2's byte-to-unicode table used by byte-level BPE: the character each byte is written as
/// in the vocabulary.
pub fn bytes_to_unicode() -> &'static [char] {
    static TABLE: std::sync::LazyLock<Vec<char>> = std::sync::LazyLock::new(table);
    &TABLE
}

/// The byte GPT-2's table writes as `c`, if any (the inverse of [`bytes_to_unicode`]).
fn unicode_byte(c: char) -> Option<u8> {
    static INVERSE: std::sync::LazyLock<std::collections::HashMap<char, u8>> =
        std::sync::LazyLock::new(|| bytes_to_unicode().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect());
    INVERSE.get(&c).copied()
}

fn table() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// The byte of a SentencePiece byte token (`<0xE2>`).
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    hex_byte(hex)
}

/// The byte of a `\xNN` escape at the start of `s`.
fn escape_at(s: &str) -> Option<u8> {
    s.strip_prefix("\\x").and_then(|h| h.get(..2)).and_then(hex_byte)
}

/// Two hex digits (no sign, which `from_str_radix` would take).
fn hex_byte(hex: &str) -> Option<u8> {
    (hex.len() == 2 && hex.bytes().all(|c| c.is_ascii_hexdigit())).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// Bytes as text: whole characters as they are, the bytes of incomplete ones as `\xE2`, and a
/// backslash that would read as such an escape as `\x5C`. [`unescape_bytes`] reads it back.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        for (i, c) in valid.char_indices() {
            if escape_at(&valid[i..]).is_some() {
                s.push_str("\\x5C");
            } else {
                s.push(c);
            }
        }
        for &b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02X}"));
        }
    }
    s
}

/// A token's text in double quotes for display: spaces visible, unprintable and invisible
/// characters escaped (`"\n"`, `"\u{200b}"`, `"❤\u{fe0f}"`), combining marks as they are unless
/// they start the text (Rust's `{:?}` escapes them all: Bengali "স্ক" would read "স\u{9cd}ক"),
/// and `\xNN` escapes with their one backslash, as they are typed. (Only those are read back:
/// `\n` here stands for a newline that is typed as one.)
pub fn quoted(text: &str) -> String {
    let mut s = String::from('"');
    for c in text.escape_debug().to_string().replace("\\'", "'").chars() {
        // Invisible marks that escape_debug leaves (they extend a grapheme): "❤" and "❤\u{fe0f}"
        // must not look the same.
        match default_ignorable(c) {
            true => s.push_str(&format!("\\u{{{:x}}}", c as u32)),
            false => s.push(c),
        }
    }
    s.push('"');
    s.replace("\\\\x", "\\x")
}

/// Unicode's Default_Ignorable_Code_Point: characters that show nothing.
fn default_ignorable(c: char) -> bool {
    matches!(c as u32,
        0xAD | 0x34F | 0x61C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F | 0x200B..=0x200F | 0x202A..=0x202E
        | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8 | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

/// The bytes of text written by [`escape_bytes`], if it has at least one `\xNN`.
pub fn unescape_bytes(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut escaped = false;
    while let Some(c) = rest.chars().next() {
        if let Some(b) = escape_at(rest) {
            out.push(b);
            rest = &rest[4..];
            escaped = true;
        } else {
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            rest = &rest[c.len_utf8()..];
        }
    }
    escaped.then_some(out)
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) from the vocabulary and merges, with the
/// model's pre-tokenizer rules.
fn byte_level(c: &Content, tokens: &[String]) -> Result<Tokenizer> {
    let merges: Vec<String> = match meta(c, "tokenizer.ggml.merges") {
        Some(v) => v
            .to_vec()
            .map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.merges: {e}")))?
            .iter()
            .map(|x| x.to_string().cloned().map_err(|e| Error::Tokenizer(format!("tokenizer.ggml.merges: {e}"))))
            .collect::<Result<_>>()?,
        None => return Err(Error::Tokenizer("missing tokenizer.ggml.merges".into())),
    };
    let pre = meta(c, "tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| Error::Tokenizer(format!("bad merge {m:?}"))))
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tk = Tokenizer::new(bpe);
    let pre_tok: PreTokenizerWrapper = match pre.as_str() {
        "llama-bpe" | "llama3" => Sequence::new(vec![
            Split::new(SplitPattern::Regex(LLAMA3_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        // "smollm" (SmolLM/SmolLM2) splits digits one by one before the GPT-2 byte-level regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        _ => ByteLevel::new(false, true, true).into(),
    };
    tk.with_pre_tokenizer(Some(pre_tok));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tk)
}

/// A SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`: Gemma, Llama 2): spaces become
/// "▁", pieces merge by score, and what the vocabulary lacks falls back to `<0xXX>` byte tokens.
/// Built as Hugging Face's converter builds such a tokenizer.json: the merges are every pair of
/// pieces whose concatenation is a piece, ranked by that piece's score (best first).
fn sentencepiece(tokens: &[String], scores: &[f32], types: &[i32], unk: Option<String>, space_prefix: bool) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::normalizers::{Prepend, Replace};
    use tokenizers::NormalizerWrapper;

    if scores.len() != tokens.len() {
        return Err(Error::Tokenizer(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // Normal (1) pieces take part in merges; control, unknown, byte and unused ones do not.
    let mergeable = |i: usize| types.get(i).is_none_or(|&t| t == 1);
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate().filter(|(i, _)| mergeable(*i)) {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .filter(|&(l, r)| mergeable(l) && mergeable(r))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (scores[id], id, l, r)));
    }
    // Stable: equal scores keep vocabulary order, as the converter's sort does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    let merges: Vec<(String, String)> = merges.into_iter().map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone())).collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let mut tk = Tokenizer::new(bpe.build().map_err(|e| Error::Tokenizer(e.to_string()))?);
    let replace = Replace::new(" ", "▁").map_err(|e| Error::Tokenizer(e.to_string()))?;
    let normalizer: NormalizerWrapper = if space_prefix {
        tokenizers::normalizers::Sequence::new(vec![Prepend::new("▁".into()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tk.with_normalizer(Some(normalizer)).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let space = Replace::new("▁", " ").map_err(|e| Error::Tokenizer(e.to_string()))?;
    tk.with_decoder(Some(DecoderSequence::new(vec![space.into(), ByteFallback::default().into(), Fuse::default().into()])));
    Ok(tk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece vocabulary of the Llama 2 kind (a space is added before the text) and of
    /// the Gemma kind (none), with a piece that merges never make.
    fn sp(space_prefix: bool) -> Tok {
        let pieces = ["<unk>", "<s>", "</s>", "▁", "d", "o", "g", "x", "do", "dog", "▁d", "▁do", "▁dog", "▁xdog"];
        let tokens: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        let types: Vec<i32> = (0..tokens.len()).map(|i| [2, 3, 3].get(i).copied().unwrap_or(1)).collect();
        let inner = sentencepiece(&tokens, &scores, &types, Some("<unk>".into()), space_prefix).unwrap();
        Tok { inner, bos_id: Some(1), eos_ids: vec![2], add_bos: true, bos_token: None, eos_token: None }
    }

    #[test]
    fn every_sentencepiece_token_is_named_by_its_text() {
        for space_prefix in [true, false] {
            let tok = sp(space_prefix);
            for id in 3..tok.vocab_size() as u32 {
                let text = tok.token_text(id);
                assert_eq!(tok.single_token(&text).unwrap(), id, "{text:?}, space prefix {space_prefix}");
            }
            // "▁xdog" is never made ("▁" + "x" has no piece to merge into): its text still names it.
            assert_ne!(tok.encode_raw(" xdog").unwrap().len(), 1);
            assert_eq!(tok.single_token(" xdog").unwrap(), tok.token_to_id("▁xdog").unwrap());
        }
        // With the added space, typing "dog" tokenizes as " dog"; the text names the piece "dog".
        let tok = sp(true);
        assert_eq!(tok.encode_raw("dog").unwrap(), [tok.token_to_id("▁dog").unwrap()]);
        assert_eq!(tok.single_token("dog").unwrap(), tok.token_to_id("dog").unwrap());
        assert!(tok.single_token("gd").is_err());
    }
}
