//! Property tests of request decoding: the JSON bodies of the API (`GenerateRequest`,
//! `NextTokenRequest`, `SweepRequest`, `ClampSpec`) and the `L:N:V` text form of a clamp. Any input
//! decodes or fails with an error, never a panic; every valid request survives a round trip through
//! JSON; and an unknown key is refused by name (`deny_unknown_fields`), so a typo in a client is an
//! error rather than a silently ignored setting.
//!
//! Floats are generated where JSON brings them back exactly. `NaN` and infinities are not JSON
//! numbers at all. Beyond that, serde_json's default float parser (without its `float_roundtrip`
//! feature) can be one unit in the last place off for long decimals, so the `f64` fields use
//! decimals of at most 5 significant digits, and the `f32` fields values in ±[1e-4, 8000] (and 0):
//! their shortest forms have at most 9 digits with a decimal exponent of at most 12, which parse
//! to the nearest `f64` exactly and can then not straddle an `f32` rounding midpoint.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use shared::{ChatMessage, ClampSpec, GenerateRequest, NextTokenRequest, PromptSpec, SamplingParams, SweepRequest};

/// Bounded, and no regression files written into the repository.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

const GENERATE_FIELDS: [&str; 5] = ["prompt", "clamps", "sampling", "compare", "stream"];
const NEXT_TOKEN_FIELDS: [&str; 3] = ["prompt", "clamps", "top_k"];
const SWEEP_FIELDS: [&str; 5] = ["prompt", "layer", "neuron", "target", "values"];
const CLAMP_FIELDS: [&str; 3] = ["layer", "neuron", "value"];
const PROMPT_FIELDS: [&str; 3] = ["text", "chat", "messages"];
const SAMPLING_FIELDS: [&str; 4] = ["temperature", "top_p", "seed", "max_new_tokens"];

/// Every field name of every request type: keys that make random JSON decode further.
const ALL_FIELDS: [&str; 20] = [
    "prompt",
    "clamps",
    "sampling",
    "compare",
    "stream",
    "top_k",
    "layer",
    "neuron",
    "target",
    "values",
    "value",
    "text",
    "chat",
    "messages",
    "role",
    "content",
    "temperature",
    "top_p",
    "seed",
    "max_new_tokens",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z ,.!?]{0,16}", vec(any::<char>(), 0..16).prop_map(|cs| cs.into_iter().collect::<String>())]
}

/// An `f32` that comes back bit for bit from JSON (module comment).
fn json_f32() -> impl Strategy<Value = f32> {
    prop_oneof![Just(0.0f32), 1.0e-4f32..8000.0f32, -8000.0f32..-1.0e-4f32]
}

/// An `f64` with at most 5 significant digits (module comment).
fn short_f64() -> impl Strategy<Value = f64> {
    (-50_000i32..=50_000).prop_map(|x| f64::from(x) / 1000.0)
}

fn message() -> impl Strategy<Value = ChatMessage> {
    (text(), text()).prop_map(|(role, content)| ChatMessage { role, content })
}

fn prompt() -> impl Strategy<Value = PromptSpec> {
    (text(), option::of(any::<bool>()), option::of(vec(message(), 0..3))).prop_map(|(text, chat, messages)| PromptSpec { text, chat, messages })
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (short_f64(), option::of(short_f64()), any::<u64>(), any::<usize>()).prop_map(|(temperature, top_p, seed, max_new_tokens)| SamplingParams {
        temperature,
        top_p,
        seed,
        max_new_tokens,
    })
}

fn clamp() -> impl Strategy<Value = ClampSpec> {
    (any::<usize>(), any::<usize>(), json_f32()).prop_map(|(layer, neuron, value)| ClampSpec { layer, neuron, value })
}

fn generate_request() -> impl Strategy<Value = GenerateRequest> {
    (prompt(), vec(clamp(), 0..4), sampling(), any::<bool>(), any::<bool>(), any::<usize>())
        .prop_map(|(prompt, clamps, sampling, compare, stream, samples)| GenerateRequest { samples, prompt, clamps, sampling, compare, stream })
}

fn next_token_request() -> impl Strategy<Value = NextTokenRequest> {
    (prompt(), vec(clamp(), 0..4), any::<usize>()).prop_map(|(prompt, clamps, top_k)| NextTokenRequest { prompt, clamps, top_k })
}

fn sweep_request() -> impl Strategy<Value = SweepRequest> {
    (prompt(), any::<usize>(), any::<usize>(), text(), vec(json_f32(), 0..8)).prop_map(|(prompt, layer, neuron, target, values)| SweepRequest {
        prompt,
        layer,
        neuron,
        target,
        values,
    })
}

/// An object key: a field name of some request type, or anything.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(ALL_FIELDS.to_vec()).prop_map(str::to_owned), "[a-z_]{1,12}", "\\PC{0,8}"]
}

/// Any JSON value, nested up to 4 deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (-2000i32..2000).prop_map(Value::from),
        text().prop_map(Value::String),
        key().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key(), inner), 0..6).prop_map(|kvs| Value::Object(kvs.into_iter().collect())),
        ]
    })
}

/// A valid request with one key, at the top or inside its prompt or sampling object, set to any value.
fn near_valid() -> impl Strategy<Value = Value> {
    (generate_request(), prop::sample::select(vec!["", "/prompt", "/sampling"]), key(), json_value()).prop_map(|(r, at, k, v)| {
        let mut json = serde_json::to_value(r).expect("a request serializes");
        if let Some(Value::Object(map)) = json.pointer_mut(at) {
            map.insert(k, v);
        }
        json
    })
}

/// Feed `s` to every decoder; only a panic can fail this.
fn decode_all_str(s: &str) {
    let _ = serde_json::from_str::<GenerateRequest>(s);
    let _ = serde_json::from_str::<NextTokenRequest>(s);
    let _ = serde_json::from_str::<SweepRequest>(s);
    let _ = serde_json::from_str::<ClampSpec>(s);
    let _ = serde_json::from_str::<PromptSpec>(s);
    let _ = serde_json::from_str::<SamplingParams>(s);
    let _ = s.parse::<ClampSpec>();
}

/// Feed `v` to every decoder; only a panic can fail this.
fn decode_all_value(v: &Value) {
    let _ = serde_json::from_value::<GenerateRequest>(v.clone());
    let _ = serde_json::from_value::<NextTokenRequest>(v.clone());
    let _ = serde_json::from_value::<SweepRequest>(v.clone());
    let _ = serde_json::from_value::<ClampSpec>(v.clone());
    let _ = serde_json::from_value::<PromptSpec>(v.clone());
    let _ = serde_json::from_value::<SamplingParams>(v.clone());
}

/// `v` through JSON text and through a `serde_json::Value` comes back equal.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) -> Result<(), TestCaseError> {
    let text = serde_json::to_string(v).map_err(|e| TestCaseError::fail(format!("serializing {v:?}: {e}")))?;
    let back: T = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("decoding {text}: {e}")))?;
    prop_assert_eq!(&back, v, "through {}", text);
    let value = serde_json::to_value(v).map_err(|e| TestCaseError::fail(format!("serializing {v:?}: {e}")))?;
    let back: T = serde_json::from_value(value).map_err(|e| TestCaseError::fail(format!("decoding the value of {text}: {e}")))?;
    prop_assert_eq!(&back, v, "through a Value of {}", text);
    Ok(())
}

/// `v` with `extra: value` added to the object at JSON pointer `at` (whose field names are
/// `fields`) fails to decode, from a `Value` and from text, with an "unknown field" error.
fn refuses_extra<T: Serialize + DeserializeOwned>(v: &T, at: &str, fields: &[&str], extra: &str, value: &Value) -> Result<(), TestCaseError> {
    if fields.contains(&extra) {
        return Ok(());
    }
    let mut json = serde_json::to_value(v).map_err(|e| TestCaseError::fail(e.to_string()))?;
    match json.pointer_mut(at) {
        Some(Value::Object(map)) => {
            map.insert(extra.to_owned(), value.clone());
        }
        other => return Err(TestCaseError::fail(format!("no object at {at:?}: {other:?}"))),
    }
    let text = json.to_string();
    let errors = [serde_json::from_value::<T>(json).err(), serde_json::from_str::<T>(&text).err()];
    for e in errors {
        match e {
            None => return Err(TestCaseError::fail(format!("decoded despite the unknown key: {text}"))),
            Some(e) => prop_assert!(e.to_string().contains("unknown field"), "{} (for {})", e, text),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary text (free, JSON-like or unicode) never panics a request decoder, JSON or `L:N:V`.
    #[test]
    fn arbitrary_text_never_panics(s in prop_oneof!["\\PC{0,64}", "[\\[\\]{}\":,0-9a-z.eE+\\- ]{0,64}", any::<String>()]) {
        decode_all_str(&s);
    }

    /// Arbitrary JSON values and near-valid requests never panic the decoders, as values or as text.
    #[test]
    fn arbitrary_json_never_panics(v in prop_oneof![json_value(), near_valid()]) {
        decode_all_value(&v);
        decode_all_str(&v.to_string());
    }

    /// Every valid request and clamp round-trips through JSON to an equal value.
    #[test]
    fn requests_round_trip(g in generate_request(), n in next_token_request(), s in sweep_request(), c in clamp()) {
        round_trip(&g)?;
        round_trip(&n)?;
        round_trip(&s)?;
        round_trip(&c)?;
    }

    /// An extra key that is not a field, at the top level (or in prompt/sampling), is refused as `unknown field`.
    #[test]
    fn unknown_fields_are_refused(
        g in generate_request(),
        n in next_token_request(),
        s in sweep_request(),
        c in clamp(),
        extra in key(),
        value in json_value(),
    ) {
        refuses_extra(&g, "", &GENERATE_FIELDS, &extra, &value)?;
        refuses_extra(&n, "", &NEXT_TOKEN_FIELDS, &extra, &value)?;
        refuses_extra(&s, "", &SWEEP_FIELDS, &extra, &value)?;
        refuses_extra(&c, "", &CLAMP_FIELDS, &extra, &value)?;
        refuses_extra(&g, "/prompt", &PROMPT_FIELDS, &extra, &value)?;
        refuses_extra(&g, "/sampling", &SAMPLING_FIELDS, &extra, &value)?;
    }

    /// `ClampSpec`'s `L:N:V` text form round-trips for every finite value, surrounding whitespace ignored.
    #[test]
    fn clamp_text_form_round_trips(layer in any::<usize>(), neuron in any::<usize>(), value in any::<f32>(), pad in "[ \t\n]{0,2}") {
        let c = ClampSpec { layer, neuron, value };
        let text = format!("{pad}{c}{pad}");
        prop_assert_eq!(text.parse::<ClampSpec>(), Ok(c), "{:?}", text);
    }

    /// A clamp text with other than three `:`-separated parts is an error.
    #[test]
    fn clamp_text_needs_three_parts(c in clamp(), extra in "[0-9a-z.]{0,4}") {
        let two = format!("{}:{}", c.layer, c.neuron);
        let four = format!("{c}:{extra}");
        prop_assert!(two.parse::<ClampSpec>().is_err(), "{:?}", two);
        prop_assert!(four.parse::<ClampSpec>().is_err(), "{:?}", four);
    }
}
