//! Tests of the "Copy as curl" commands (`frontend::share`): each must be one POSIX shell command
//! whose words are exactly the URL and body the page sends, whatever they contain. A small
//! POSIX-like tokenizer (quotes, backslashes, whitespace) splits the commands back into words.
//! Pure Rust, run natively.

use frontend::share::{curl_get, curl_post, generate_request, shell_quote, verify_request, ApiRequest};
use frontend::state::{NeuronState, SearchState, SteerState};
use proptest::prelude::*;

/// Split a command line as a POSIX shell does for words: unquoted whitespace separates; inside
/// single quotes everything is literal; inside double quotes a backslash escapes `$`, `` ` ``,
/// `"`, `\` and a newline; outside quotes a backslash escapes any character. Unterminated quotes
/// are an error. (No expansions: the commands must never need them.)
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('$' | '`' | '"' | '\\')) => w.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c @ ('$' | '`')) => return Err(format!("expansion {c} in double quotes")),
                        Some(c) => w.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("trailing backslash".into()),
            },
            '$' | '`' | '|' | '&' | ';' | '<' | '>' | '(' | ')' | '*' | '?' | '[' | '#' | '~' => {
                return Err(format!("unquoted shell metacharacter {c:?}"))
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

fn words(ws: &[&str]) -> Vec<String> {
    ws.iter().map(|w| w.to_string()).collect()
}

#[test]
fn the_tokenizer_reads_shell_quoting() {
    assert_eq!(split_words(r#"a 'b c' "d e" f\ g 'h'\''i'"#).unwrap(), words(&["a", "b c", "d e", "f g", "h'i"]));
    assert_eq!(split_words("''").unwrap(), words(&[""]));
    assert!(split_words("'open").is_err());
    assert!(split_words("a&b").is_err());
    assert!(split_words("$HOME").is_err());
}

#[test]
fn quoting_spaces_quotes_newlines_and_unicode() {
    assert_eq!(shell_quote(" dog"), "' dog'");
    assert_eq!(shell_quote("I'm"), r"'I'\''m'");
    assert_eq!(shell_quote("line 1\nline 2"), "'line 1\nline 2'");
    assert_eq!(shell_quote("ü 🐶 犬"), "'ü 🐶 犬'");
    for s in ["", " ", "'", "''", "a'b'c", "\n", "tab\there", "$(rm -rf /) `x` \\ \"q\" !", "ü 🐶 犬", "end'"] {
        assert_eq!(split_words(&shell_quote(s)).unwrap(), vec![s.to_owned()], "{s:?}");
    }
}

#[test]
fn get_commands() {
    let c = curl_get("https://host", "/api/models/m/search?tokens=%20dog&view=up&top=50");
    assert_eq!(c, "curl 'https://host/api/models/m/search?tokens=%20dog&view=up&top=50'");
    assert_eq!(split_words(&c).unwrap(), words(&["curl", "https://host/api/models/m/search?tokens=%20dog&view=up&top=50"]));
    // A trailing slash on the origin is not doubled.
    assert_eq!(curl_get("http://127.0.0.1:8080/", "/api/models"), "curl 'http://127.0.0.1:8080/api/models'");
}

#[test]
fn post_commands() {
    let body = r#"{"prompt":{"text":"It's a\ndog 🐶"}}"#;
    let c = curl_post("https://host", "/api/models/m/generate", body);
    assert_eq!(
        c,
        r#"curl -X POST 'https://host/api/models/m/generate' -H 'content-type: application/json' -d '{"prompt":{"text":"It'\''s a\ndog 🐶"}}'"#
    );
    assert_eq!(
        split_words(&c).unwrap(),
        words(&["curl", "-X", "POST", "https://host/api/models/m/generate", "-H", "content-type: application/json", "-d", body])
    );
}

#[test]
fn page_requests_round_trip() {
    let origin = "https://interp.example";
    // The search page's map search: the same URL the page fetches.
    let s = SearchState { q: " dog, it's,ü".into(), ..Default::default() };
    let path = s.api_url("m", 50);
    assert_eq!(split_words(&ApiRequest::get(path.clone()).curl(origin)).unwrap(), vec!["curl".to_owned(), format!("{origin}{path}")]);

    // The steer page's generation: the page's request with stream off.
    let steer = SteerState { prompt: "Say 'woof'\nthen stop — 🐶".into(), clamps: "29:808:12,3:4:-2.5".into(), seed: 7, ..Default::default() };
    let r = generate_request(&steer, "smollm2 135m").unwrap();
    let ApiRequest::Post { path, body } = &r else { panic!("a POST") };
    assert_eq!(path, "/api/models/smollm2%20135m/generate");
    let w = split_words(&r.curl(origin)).unwrap();
    assert_eq!(w[..4], words(&["curl", "-X", "POST", "https://interp.example/api/models/smollm2%20135m/generate"]));
    assert_eq!(w[4..7], words(&["-H", "content-type: application/json", "-d"]));
    assert_eq!(&w[7], body);
    assert_eq!(w.len(), 8);
    let mut sent = steer.request(steer.validate().unwrap());
    assert!(sent.stream);
    sent.stream = false;
    assert_eq!(*body, serde_json::to_string(&sent).unwrap());
    assert!(body.contains(r#""stream":false"#), "{body}");

    // The search page's verification and the neuron page's sweep: the same structs, as JSON.
    let v = SearchState { q: " Sherlock Holmes".into(), phrase: true, vp: "Who's the detective?".into(), ..Default::default() };
    let r = verify_request(&v, "m").unwrap();
    assert_eq!(r, ApiRequest::Post { path: "/api/models/m/verify".into(), body: serde_json::to_string(&v.verify_request().unwrap()).unwrap() });
    let ApiRequest::Post { body, .. } = &r else { panic!("a POST") };
    assert_eq!(split_words(&r.curl(origin)).unwrap()[7], *body);

    let n = NeuronState { target: " dog".into(), prompt: Some("My dog's name is".into()), ..NeuronState::new(29, 808, None) };
    let r = ApiRequest::post(NeuronState::sweep_url("m"), &n.sweep_request().unwrap());
    let w = split_words(&r.curl(origin)).unwrap();
    assert_eq!(w[3], "https://interp.example/api/models/m/sweep");
    let back: shared::SweepRequest = serde_json::from_str(&w[7]).unwrap();
    assert_eq!(back, n.sweep_request().unwrap());
}

#[test]
fn unsendable_forms_have_no_command() {
    assert!(generate_request(&SteerState::default(), "m").is_err());
    assert!(generate_request(&SteerState { clamps: "29:808:99999".into(), ..Default::default() }, "m").is_err());
    assert!(verify_request(&SearchState::default(), "m").is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_round_trips_through_quoting(s in any::<String>()) {
        prop_assert_eq!(split_words(&shell_quote(&s)).unwrap(), vec![s]);
    }

    #[test]
    fn any_post_round_trips(path in "/api/[a-z%0-9/?=&]{0,30}", body in any::<String>()) {
        let c = curl_post("https://h", &path, &body);
        let w = split_words(&c).unwrap();
        prop_assert_eq!(w.len(), 8);
        prop_assert_eq!(&w[3], &format!("https://h{path}"));
        prop_assert_eq!(&w[7], &body);
    }
}
