//! Sharing a view: the "Share" button copies the page's permalink (every page's whole state is
//! in its URL), "Embed" copies an iframe of the page's `embed=1` rendering, and "Copy as curl" copies the API request behind a view as a curl command with
//! the page's origin, so a result can be reproduced from a shell. The commands are built by pure
//! functions, quoted for POSIX shells and unit-tested natively; the clipboard and the page's
//! location are reached only in the browser (`cfg(target_arch = "wasm32")`, as in `chart.rs`).
//!
//! Each button says "Link copied" (or "curl command copied") for two seconds in a `.copied`
//! element; where the clipboard is missing (an insecure origin) or refuses, the text is shown
//! instead in a read-only field, selected for copying by hand.

use leptos::html::Input;
use leptos::prelude::*;
use serde::Serialize;

use crate::state::{SearchState, SteerState};

/// How long the confirmation stays, in milliseconds.
const COPIED_MS: u64 = 2000;

/// `s` as one word of a POSIX shell: in single quotes, each embedded single quote written as
/// `'\''` (close the quotes, an escaped quote, reopen). Everything else, newlines and unicode
/// included, stands for itself inside single quotes.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `origin` and an API path as one absolute URL.
fn absolute(origin: &str, path: &str) -> String {
    format!("{}{path}", origin.trim_end_matches('/'))
}

/// The curl command of a GET of `path` on `origin` (`https://host`).
pub fn curl_get(origin: &str, path: &str) -> String {
    format!("curl {}", shell_quote(&absolute(origin, path)))
}

/// The curl command of a POST of the JSON `body_json` to `path` on `origin`.
pub fn curl_post(origin: &str, path: &str, body_json: &str) -> String {
    format!(
        "curl -X POST {} -H {} -d {}",
        shell_quote(&absolute(origin, path)),
        shell_quote("content-type: application/json"),
        shell_quote(body_json)
    )
}

/// An API request a view makes: its path (with its query string) and, for a POST, its JSON body.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    Get { path: String },
    Post { path: String, body: String },
}

impl ApiRequest {
    pub fn get(path: impl Into<String>) -> Self {
        ApiRequest::Get { path: path.into() }
    }
    /// A POST of `body` as the page sends it (`serde_json`, as `gloo_net`'s `.json()` writes it).
    pub fn post<B: Serialize>(path: impl Into<String>, body: &B) -> Self {
        ApiRequest::Post { path: path.into(), body: serde_json::to_string(body).unwrap_or_default() }
    }
    /// The request as a curl command against `origin`.
    pub fn curl(&self, origin: &str) -> String {
        match self {
            ApiRequest::Get { path } => curl_get(origin, path),
            ApiRequest::Post { path, body } => curl_post(origin, path, body),
        }
    }
}

/// The steer page's generation for `s` as curl would run it: its first sample (seed `s.seed`),
/// answered as one JSON document (`"stream": false`) instead of the page's stream of events.
pub fn generate_request(s: &SteerState, model: &str) -> Result<ApiRequest, String> {
    let mut req = s.request(s.validate()?);
    req.stream = false;
    Ok(ApiRequest::post(SteerState::generate_url(model), &req))
}

/// The search page's causal verification for `s`, as its "Verify causally" button sends it.
pub fn verify_request(s: &SearchState, model: &str) -> Result<ApiRequest, String> {
    Ok(ApiRequest::post(SearchState::verify_url(model), &s.verify_request()?))
}

/// The title of the steer page's curl button.
pub const GENERATE_CURL_TITLE: &str = "Copy the generation as a curl command. It asks for \"stream\": false, so the answer is one JSON \
     document instead of the page's stream of tokens, with every sample (sample i samples with the seed plus i).";

/// The title of a curl button of a GET view.
const CURL_TITLE: &str = "Copy the API request behind this view as a curl command";

#[cfg(target_arch = "wasm32")]
mod browser {
    use wasm_bindgen::JsCast;

    fn location() -> Option<web_sys::Location> {
        web_sys::window().map(|w| w.location())
    }

    /// The page's full URL (its permalink).
    pub fn href() -> String {
        location().and_then(|l| l.href().ok()).unwrap_or_default()
    }

    /// The page's origin (`https://host:port`).
    pub fn origin() -> String {
        location().and_then(|l| l.origin().ok()).unwrap_or_default()
    }

    /// The page's path and its query string.
    pub fn path_and_search() -> (String, String) {
        location().map(|l| (l.pathname().unwrap_or_default(), l.search().unwrap_or_default())).unwrap_or_default()
    }

    /// The document's title.
    pub fn title() -> String {
        web_sys::window().and_then(|w| w.document()).map(|d| d.title()).unwrap_or_default()
    }

    /// Put `text` on the clipboard. `navigator.clipboard` is missing outside secure contexts
    /// (plain http but for localhost), so it is looked up rather than assumed.
    pub async fn copy(text: &str) -> Result<(), String> {
        let window = web_sys::window().ok_or("no window")?;
        let navigator = window.navigator();
        let clipboard = js_sys::Reflect::get(navigator.as_ref(), &"clipboard".into()).map_err(|e| format!("{e:?}"))?;
        if clipboard.is_undefined() || clipboard.is_null() {
            return Err("the clipboard is not available here".into());
        }
        let clipboard: web_sys::Clipboard = clipboard.unchecked_into();
        wasm_bindgen_futures::JsFuture::from(clipboard.write_text(text)).await.map(|_| ()).map_err(|e| format!("{e:?}"))
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod browser {
    pub fn href() -> String {
        String::new()
    }

    pub fn origin() -> String {
        String::new()
    }

    pub fn path_and_search() -> (String, String) {
        Default::default()
    }

    pub fn title() -> String {
        String::new()
    }

    pub async fn copy(_text: &str) -> Result<(), String> {
        Err("no clipboard outside the browser".into())
    }
}

/// What a copy button shows after a click.
#[derive(Debug, Clone, PartialEq)]
enum Copied {
    /// On the clipboard.
    Done,
    /// The clipboard refused: the text, to copy by hand.
    Manual(String),
}

/// A button that copies `text()` (read when clicked), then confirms for two seconds or shows the
/// text for copying by hand.
fn copy_button(
    id: Option<&'static str>,
    class: &'static str,
    label: &'static str,
    done: &'static str,
    title: String,
    text: impl Fn() -> String + 'static,
) -> impl IntoView {
    let copied = RwSignal::new(None::<Copied>);
    // A later click's confirmation is not hidden by an earlier click's timer.
    let generation = StoredValue::new(0u64);
    let on_click = move |_| {
        let t = text();
        let g = generation.get_value() + 1;
        generation.set_value(g);
        copied.set(None);
        leptos::task::spawn_local(async move {
            match browser::copy(&t).await {
                Ok(()) => {
                    copied.try_set(Some(Copied::Done));
                    set_timeout(
                        move || {
                            if generation.try_get_value() == Some(g) {
                                copied.try_set(None);
                            }
                        },
                        std::time::Duration::from_millis(COPIED_MS),
                    );
                }
                Err(_) => {
                    copied.try_set(Some(Copied::Manual(t)));
                }
            }
        });
    };
    view! {
        <span class="copy">
            <button type="button" id=id class=format!("secondary {class}") title=title on:click=on_click>{label}</button>
            {move || match copied.get() {
                None => None,
                Some(Copied::Done) => Some(view! { <span class="copied" role="status">{done}</span> }.into_any()),
                Some(Copied::Manual(t)) => Some(view! { <ManualCopy text=t /> }.into_any()),
            }}
        </span>
    }
}

/// The text in a read-only field, selected, for copying by hand.
#[component]
fn ManualCopy(text: String) -> impl IntoView {
    let node = NodeRef::<Input>::new();
    Effect::new(move || {
        if let Some(el) = node.get() {
            let _ = el.focus();
            el.select();
        }
    });
    view! {
        <label class="copy-manual">
            "Copy it by hand: "
            <input type="text" class="copy-text" readonly=true node_ref=node prop:value=text
                on:focus=move |_| { if let Some(el) = node.get_untracked() { el.select() } } />
        </label>
    }
}

/// "Share": copies the page's permalink.
#[component]
pub fn ShareButton() -> impl IntoView {
    copy_button(Some("share"), "share", "Share", "Link copied", "Copy this page's link: every setting of the view is in it".to_owned(), browser::href)
}

/// "Embed": copies an iframe of this page's embed rendering, `height` pixels high.
#[component]
pub fn EmbedButton(height: u32) -> impl IntoView {
    copy_button(
        Some("embed"),
        "embed",
        "Embed",
        "iframe code copied",
        "Copy HTML that embeds this view (without the site's header, with a link back) in a blog post or a notebook".to_owned(),
        move || {
            let (path, search) = browser::path_and_search();
            let url = format!("{}{}", browser::origin(), crate::state::embed_url(&path, &search));
            crate::state::iframe_snippet(&url, height, &browser::title())
        },
    )
}

/// "Copy as curl": copies `request` as a curl command against the page's origin; shown while
/// there is a request.
#[component]
pub fn CurlButton(
    #[prop(into)] request: Signal<Option<ApiRequest>>,
    #[prop(optional)] id: Option<&'static str>,
    #[prop(optional, into)] title: Option<String>,
) -> impl IntoView {
    // Shown or not only changes with the request's presence: typing keeps the same button.
    let shown = Memo::new(move |_| request.with(Option::is_some));
    let title = title.unwrap_or_else(|| CURL_TITLE.to_owned());
    move || {
        shown.get().then(|| {
            copy_button(id, "copy-curl", "Copy as curl", "curl command copied", title.clone(), move || {
                request.get_untracked().map(|r| r.curl(&browser::origin())).unwrap_or_default()
            })
        })
    }
}

/// The bar under a page's title: "Share", "Embed" (for pages with an embed rendering, given
/// the iframe's height), and "Copy as curl" for the page's main request. Not shown in an embed.
#[component]
pub fn ShareBar(
    #[prop(optional, into)] curl: Option<Signal<Option<ApiRequest>>>,
    #[prop(optional)] curl_id: Option<&'static str>,
    #[prop(optional, into)] curl_title: Option<String>,
    #[prop(optional)] embed_height: Option<u32>,
) -> impl IntoView {
    if crate::embedded() {
        return None;
    }
    Some(view! {
        <div class="share-bar">
            <ShareButton />
            {embed_height.map(|h| view! { <EmbedButton height=h /> })}
            {curl.map(|request| match curl_title {
                Some(title) => view! { <CurlButton request=request id=curl_id.unwrap_or("curl") title=title /> }.into_any(),
                None => view! { <CurlButton request=request id=curl_id.unwrap_or("curl") /> }.into_any(),
            })}
        </div>
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_everything_literal() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote(" dog"), "' dog'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("''"), r"''\'''\'''");
        assert_eq!(shell_quote("a\nb"), "'a\nb'");
        assert_eq!(shell_quote("$HOME `x` \\ \"q\" 🐶 ü"), "'$HOME `x` \\ \"q\" 🐶 ü'");
    }

    #[test]
    fn curl_commands() {
        assert_eq!(
            curl_get("https://host", "/api/models/m/search?tokens=%20dog&view=up&top=50"),
            "curl 'https://host/api/models/m/search?tokens=%20dog&view=up&top=50'"
        );
        assert_eq!(curl_get("http://h:8080/", "/api/models"), "curl 'http://h:8080/api/models'");
        assert_eq!(
            curl_post("https://host", "/api/models/m/generate", r#"{"text":"I'm"}"#),
            r#"curl -X POST 'https://host/api/models/m/generate' -H 'content-type: application/json' -d '{"text":"I'\''m"}'"#
        );
    }

    #[test]
    fn generate_curl_is_not_streamed() {
        let s = SteerState { clamps: "29:808:12".into(), seed: 10, n: 3, prompt: "Say 'hi'".into(), ..Default::default() };
        let ApiRequest::Post { path, body } = generate_request(&s, "m").unwrap() else { panic!("a POST") };
        assert_eq!(path, "/api/models/m/generate");
        let req: shared::GenerateRequest = serde_json::from_str(&body).unwrap();
        assert!(!req.stream && req.compare);
        assert_eq!(req.sampling.seed, 10);
        assert_eq!(req.prompt.text, "Say 'hi'");
        let mut streamed = s.request(s.validate().unwrap());
        streamed.stream = false;
        assert_eq!(req, streamed);
        assert!(generate_request(&SteerState::default(), "m").is_err());
    }

    #[test]
    fn verify_curl_sends_the_panels_request() {
        let s = SearchState { q: " dog, dogs".into(), vp: "It's a".into(), ..Default::default() };
        let r = verify_request(&s, "a b").unwrap();
        assert_eq!(r, ApiRequest::post("/api/models/a%20b/verify", &s.verify_request().unwrap()));
        assert!(r.curl("https://h").starts_with("curl -X POST 'https://h/api/models/a%20b/verify' -H 'content-type: application/json' -d '{"));
        assert!(verify_request(&SearchState::default(), "m").is_err());
    }
}
