//! Property tests of the URL state (`frontend::state`): every page's state is a query string, so
//! any query string a user pastes must parse or give an error (never panic), and every state the
//! pages build must come back unchanged from its own link. Pure Rust, run natively.
//!
//! Floats: the query strings carry `f32`/`f64` in their shortest form (ryu) and read them back with
//! Rust's exact parser, so any finite value round-trips (proptest's `any::<f32>()` is finite).
//! `NaN` parses from a URL but never equals itself, so the properties over arbitrary query strings
//! compare the links (`href()`), not the structs, for the states with floats.

use frontend::state::{
    complete_with, format_clamps, last_piece, mentions, parse, parse_clamps, query_param, segment, split_tokens, sweep_values, with_model,
    ClassesState, CompareState, ModelPage, NeuronState, PolarityChoice, SearchState, SteerState,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use shared::{limits, ClampSpec, Concept, NeuronClass, Scale, View};

/// Bounded, and no regression files written into the repository.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Path and query string of a link.
fn split_href(href: &str) -> (&str, &str) {
    href.split_once('?').unwrap_or((href, ""))
}

/// Text a user could put in a field: plain, URL-special characters, or any unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z ,]{0,12}", "[a-zA-Z0-9 &=?#%+,:;/'\"]{0,12}", vec(any::<char>(), 0..12).prop_map(|cs| cs.into_iter().collect::<String>())]
}

fn view() -> impl Strategy<Value = View> {
    prop::sample::select(View::ALL.to_vec())
}

fn polarity() -> impl Strategy<Value = PolarityChoice> {
    prop_oneof![Just(PolarityChoice::Both), Just(PolarityChoice::Pos), Just(PolarityChoice::Neg)]
}

fn clamp() -> impl Strategy<Value = ClampSpec> {
    (any::<usize>(), any::<usize>(), any::<f32>()).prop_map(|(layer, neuron, value)| ClampSpec { layer, neuron, value })
}

fn class() -> impl Strategy<Value = NeuronClass> {
    prop::sample::select(NeuronClass::ALL.to_vec())
}

fn search_state() -> impl Strategy<Value = SearchState> {
    let scale = prop_oneof![Just(None), Just(Some(Scale::Raw)), Just(Some(Scale::Std))];
    (option::of(text()), text(), any::<bool>(), view(), polarity(), scale, prop_oneof![Just(String::new()), text()])
        .prop_map(|(model, q, phrase, view, polarity, scale, vp)| SearchState { model, q, phrase, view, polarity, scale, vp })
}

fn classes_state() -> impl Strategy<Value = ClassesState> {
    (option::of(text()), view(), class()).prop_map(|(model, view, class)| ClassesState { model, view, class })
}

fn neuron_state() -> impl Strategy<Value = NeuronState> {
    (
        (any::<usize>(), any::<usize>(), option::of(text()), prop_oneof![Just(String::new()), text()], option::of(text())),
        (any::<f32>(), any::<f32>(), any::<usize>(), any::<bool>(), prop_oneof![Just(None), Just(Some(Scale::Raw)), Just(Some(Scale::Std))]),
    )
        .prop_map(|((layer, neuron, model, target, prompt), (from, to, steps, log, scale))| NeuronState {
            layer,
            neuron,
            model,
            target,
            prompt,
            from,
            to,
            steps,
            log,
            scale,
        })
}

fn steer_state() -> impl Strategy<Value = SteerState> {
    (
        (option::of(text()), text(), prop_oneof![text(), vec(clamp(), 0..4).prop_map(|c| format_clamps(&c))], any::<u64>(), any::<f64>()),
        (option::of(any::<f64>()), any::<usize>(), any::<usize>(), any::<bool>(), text()),
    )
        .prop_map(|((model, prompt, clamps, seed, temp), (top_p, max, n, chat, word))| SteerState {
            model,
            prompt,
            clamps,
            seed,
            temp,
            top_p,
            max,
            n,
            chat,
            word,
        })
}

fn compare_state() -> impl Strategy<Value = CompareState> {
    (option::of(text()), option::of(text())).prop_map(|(a, b)| CompareState { a, b })
}

/// Every query key some page reads.
const KEYS: [&str; 23] = [
    "model", "q", "phrase", "view", "polarity", "vp", "target", "prompt", "from", "to", "steps", "log", "clamps", "seed", "temp", "top_p", "max",
    "n", "chat", "word", "a", "b", "class",
];

/// A piece of a query value: plain text, valid and broken percent-escapes, separators, values
/// the fields accept or almost accept, unicode.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ._~:,-]{0,8}",
        "%[0-9a-fA-F]{2}",
        "%[^&=]{0,2}",
        prop::sample::select(vec![
            "+",
            "=",
            "?",
            "#",
            ";",
            "up",
            "down",
            "gate",
            "Up",
            "pos",
            "neg",
            "both",
            "prediction",
            "suppression",
            "partition",
            "other",
            "1",
            "0",
            "true",
            "false",
            "NaN",
            "inf",
            "-1",
            "1e40",
            "0.5",
            "17",
            "12:345:8.5",
            "18446744073709551616",
        ])
        .prop_map(str::to_owned),
        "\\PC{0,4}",
    ]
}

/// A query string: `key=value` pairs (keys mostly real ones), with or without a leading `?`, or
/// any string at all.
fn query_string() -> impl Strategy<Value = String> {
    let key = prop_oneof![3 => prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned), 1 => "\\PC{0,6}"];
    let pair = (key, option::of(vec(piece(), 0..4))).prop_map(|(k, v)| match v {
        Some(v) => format!("{k}={}", v.concat()),
        None => k,
    });
    prop_oneof![
        4 => (any::<bool>(), vec(pair, 0..6)).prop_map(|(lead, pairs)| format!("{}{}", if lead { "?" } else { "" }, pairs.join("&"))),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary query strings never panic the parsers or anything run on what they parse.
    #[test]
    fn parsing_never_panics(q in query_string(), layer in any::<usize>(), neuron in any::<usize>(), model in text()) {
        let _ = parse::<Vec<(String, String)>>(&q);
        let _ = parse::<CompareState>(&q);
        let _ = query_param(&q, "model");
        let _ = with_model("/", &q, &model);
        if let Ok(s) = parse::<SearchState>(&q) {
            let _ = s.tokens();
            let _ = s.concept();
            let _ = s.api_url(&model, 100);
            let _ = s.verify_request();
            let _ = s.steer_with(&model, ClampSpec { layer, neuron, value: 1.5 }).href();
            let _ = s.href();
        }
        if let Ok(s) = parse::<ClassesState>(&q) {
            let _ = s.api_url(&model, 20);
            let _ = s.href();
        }
        if let Ok(s) = NeuronState::parse(layer, neuron, &q) {
            let _ = s.sweep_values();
            let _ = s.href();
        }
        if let Ok(s) = parse::<SteerState>(&q) {
            let _ = s.clamp_list();
            if let Ok(clamps) = s.validate() {
                let _ = s.request(clamps);
            }
            let _ = s.href();
        }
    }

    /// A state parsed from any query string gives a link that parses back to the same state.
    #[test]
    fn parsed_states_are_stable(q in query_string()) {
        if let Ok(s) = parse::<SearchState>(&q) {
            let href = s.href();
            prop_assert_eq!(parse::<SearchState>(split_href(&href).1), Ok(s), "{:?} -> {}", q, href);
        }
        if let Ok(s) = parse::<CompareState>(&q) {
            let href = s.href();
            prop_assert_eq!(parse::<CompareState>(split_href(&href).1), Ok(s), "{:?} -> {}", q, href);
        }
        if let Ok(s) = parse::<ClassesState>(&q) {
            let href = s.href();
            prop_assert_eq!(parse::<ClassesState>(split_href(&href).1), Ok(s), "{:?} -> {}", q, href);
        }
        if let Ok(s) = NeuronState::parse(3, 7, &q) {
            let href = s.href();
            let again = NeuronState::parse(3, 7, split_href(&href).1).map(|t| t.href());
            prop_assert_eq!(again, Ok(href.clone()), "{:?}", q);
        }
        if let Ok(s) = parse::<SteerState>(&q) {
            let href = s.href();
            let again = parse::<SteerState>(split_href(&href).1).map(|t| t.href());
            prop_assert_eq!(again, Ok(href.clone()), "{:?}", q);
        }
    }

    /// Any search state comes back equal from its link, at `/`.
    #[test]
    fn search_state_round_trips(s in search_state()) {
        let href = s.href();
        let (path, q) = split_href(&href);
        prop_assert_eq!(path, "/");
        prop_assert_eq!(parse::<SearchState>(q), Ok(s), "{}", href);
    }

    /// A search's API URL carries its phrase flag, and a phrase goes whole (commas and all).
    #[test]
    fn search_api_url_carries_the_phrase(s in search_state(), model in text()) {
        let url = s.api_url(&model, 50);
        let (_, q) = split_href(&url);
        prop_assert_eq!(query_param(q, "phrase"), s.phrase.then(|| "true".to_owned()), "{}", url);
        let tokens = query_param(q, "tokens").unwrap_or_default();
        if s.phrase {
            prop_assert_eq!(tokens, if s.q.trim().is_empty() { String::new() } else { s.q.clone() });
        } else {
            prop_assert_eq!(tokens, split_tokens(&s.q).join(","));
        }
        // The verification prompt is the page's, not the map search's.
        prop_assert_eq!(s.search_key().api_url(&model, 50), url);
    }

    /// Any classes state comes back equal from its link, at `/classes`.
    #[test]
    fn classes_state_round_trips(s in classes_state()) {
        let href = s.href();
        let (path, q) = split_href(&href);
        prop_assert_eq!(path, "/classes");
        prop_assert_eq!(parse::<ClassesState>(q), Ok(s), "{}", href);
    }

    /// Any neuron state comes back from its link; without a target the link keeps only the model
    /// and the scale.
    #[test]
    fn neuron_state_round_trips(s in neuron_state()) {
        let href = s.href();
        let (path, q) = split_href(&href);
        prop_assert_eq!(path.to_owned(), format!("/neuron/{}/{}", s.layer, s.neuron));
        let expected = if s.target.is_empty() { NeuronState::new(s.layer, s.neuron, s.model.clone()).with_scale(s.scale) } else { s.clone() };
        prop_assert_eq!(NeuronState::parse(s.layer, s.neuron, q), Ok(expected), "{}", href);
    }

    /// Any steer state comes back equal from its link, at `/steer`.
    #[test]
    fn steer_state_round_trips(s in steer_state()) {
        let href = s.href();
        let (path, q) = split_href(&href);
        prop_assert_eq!(path, "/steer");
        prop_assert_eq!(parse::<SteerState>(q), Ok(s), "{}", href);
    }

    /// Any compare state comes back equal from its link, at `/compare`.
    #[test]
    fn compare_state_round_trips(s in compare_state()) {
        let href = s.href();
        let (path, q) = split_href(&href);
        prop_assert_eq!(path, "/compare");
        prop_assert_eq!(parse::<CompareState>(q), Ok(s), "{}", href);
    }

    /// Clamp lists round-trip through their text form and through a steer link.
    #[test]
    fn clamp_lists_round_trip(clamps in vec(clamp(), 0..6)) {
        prop_assert_eq!(parse_clamps(&format_clamps(&clamps)), Ok(clamps.clone()));
        let mut s = SteerState::default();
        s.set_clamps(&clamps);
        let href = s.href();
        let back: SteerState = parse(split_href(&href).1).map_err(TestCaseError::fail)?;
        prop_assert_eq!(back.clamp_list(), Ok(clamps), "{}", href);
    }

    /// `with_model` keeps the path and sets the `model` parameter, whatever the query was.
    #[test]
    fn with_model_sets_the_model(q in query_string(), model in text(), path in prop::sample::select(vec!["/", "/steer", "/compare", "/neuron/1/2"])) {
        let href = with_model(path, &q, &model);
        let (p, query) = split_href(&href);
        prop_assert_eq!(p, path);
        prop_assert_eq!(query_param(query, "model"), Some(model.clone()), "{}", href);
    }

    /// `segment` escapes any text into one path segment that decodes back to it.
    #[test]
    fn segment_escapes_and_decodes_back(s in text()) {
        let seg = segment(&s);
        prop_assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"%*-._".contains(&b)), "{:?} -> {:?}", s, seg);
        let back: Vec<(String, String)> = serde_urlencoded::from_str(&format!("k={seg}")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, vec![("k".to_owned(), s.clone())]);
    }

    /// The text-box helpers never panic and split the text consistently.
    #[test]
    fn text_box_helpers_are_consistent(q in text(), token in text(), answer in text(), word in text()) {
        let (head, tail) = last_piece(&q);
        prop_assert_eq!(format!("{head}{tail}"), q.clone());
        prop_assert!(!tail.contains(','));
        let completed = complete_with(&q, &token);
        prop_assert!(completed.ends_with(token.as_str()));
        for t in split_tokens(&q) {
            prop_assert!(!t.contains(',') && !t.trim().is_empty(), "{:?}", t);
        }
        let _ = mentions(&answer, &word);
    }

    /// A word set off by punctuation is always found by `mentions`.
    #[test]
    fn mentions_finds_a_standalone_word(word in "[a-z]{1,8}", before in "[a-z]{0,6}", after in "[a-z]{0,6}") {
        let answer = format!("{before}. {}! {after}", word.to_uppercase());
        prop_assert!(mentions(&answer, &word), "{:?} in {:?}", word, answer);
    }

    /// `sweep_values` never panics; what it accepts has `steps` values, starts at `from` and never decreases.
    #[test]
    fn sweep_values_are_even_and_ordered(
        from in prop_oneof![prop::num::f32::ANY, -1000.0f32..=1000.0],
        to in prop_oneof![prop::num::f32::ANY, -1000.0f32..=1000.0],
        steps in prop_oneof![0usize..=70, any::<usize>()],
    ) {
        if let Ok(v) = sweep_values(from, to, steps) {
            prop_assert_eq!(v.len(), steps);
            prop_assert_eq!(v[0], from);
            prop_assert!(v.windows(2).all(|w| w[0] <= w[1]), "{:?}", v);
            prop_assert!(v.iter().all(|x| x.is_finite()), "{:?}", v);
        }
    }
}

#[test]
fn classes_state_defaults_stay_out_of_the_url() {
    assert_eq!(ClassesState::default().href(), "/classes");
    assert_eq!(parse::<ClassesState>("").unwrap(), ClassesState { model: None, view: View::Down, class: NeuronClass::Prediction });
    // The defaults written out parse to the same state, whose link leaves them out again.
    let spelled: ClassesState = parse("?view=down&class=prediction").unwrap();
    assert_eq!(spelled, ClassesState::default());
    assert_eq!(spelled.href(), "/classes");
    let s = ClassesState { model: Some("m".into()), class: NeuronClass::Partition, ..Default::default() };
    assert_eq!(s.href(), "/classes?model=m&class=partition");
    assert_eq!(ClassesState { view: View::Gate, ..Default::default() }.href(), "/classes?view=gate");
    assert_eq!(s.api_url("m", 30), "/api/models/m/classes?view=down&class=partition&top=30");
}

#[test]
fn classes_state_malformed_links_are_errors() {
    for bad in ["class=predict", "class=Prediction", "view=sideways", "class=", "view=up&view=down"] {
        let e = parse::<ClassesState>(bad).unwrap_err();
        assert!(e.contains("malformed"), "{bad}: {e}");
    }
}

#[test]
fn search_phrase_and_verify_prompt_defaults_stay_out_of_the_url() {
    let s = SearchState { q: " dog".into(), ..Default::default() };
    assert_eq!(s.href(), "/?q=+dog");
    let p = SearchState { phrase: true, vp: "Once upon a time".into(), ..s.clone() };
    assert_eq!(p.href(), "/?q=+dog&phrase=1&vp=Once+upon+a+time");
    assert_eq!(parse::<SearchState>("q=+dog&phrase=1&vp=Once+upon+a+time"), Ok(p.clone()));
    // An empty prompt is the default one, and stays out of the link.
    assert_eq!(SearchState { vp: String::new(), ..p.clone() }.href(), "/?q=+dog&phrase=1");
    assert_eq!(SearchState { vp: String::new(), ..p.clone() }.verify_prompt(), frontend::state::DEFAULT_VERIFY_PROMPT);
    assert_eq!(parse::<SearchState>("q=+dog&phrase=0"), Ok(s.clone()));
    assert_eq!(parse::<SearchState>("q=+dog&phrase=0").unwrap().href(), "/?q=+dog");
    // The API URL: phrase=true only for a phrase.
    assert_eq!(s.api_url("m", 50), "/api/models/m/search?tokens=+dog&view=up&top=50");
    assert_eq!(p.api_url("m", 50), "/api/models/m/search?tokens=+dog&phrase=true&view=up&top=50");
    assert_eq!(p.verify_request().map(|r| r.concept), Ok(Concept::Phrase(" dog".into())));
}

#[test]
fn search_phrase_malformed_links_are_errors() {
    for bad in ["phrase=yes", "phrase=2", "phrase=", "phrase=TRUE"] {
        let e = parse::<SearchState>(bad).unwrap_err();
        assert!(e.contains("malformed"), "{bad}: {e}");
    }
}

/// Every value of an accepted sweep passes the API's own check (|v| <= MAX_CLAMP_ABS).
#[test]
fn sweep_values_stay_within_the_api_limit() {
    let from = -999.99994f32;
    let v = sweep_values(from, limits::MAX_CLAMP_ABS, 2).expect("the range is accepted");
    assert!(v.iter().all(|x| x.abs() <= limits::MAX_CLAMP_ABS), "{v:?}");
}
