//! The Flash Interp web app (leptos, client-side rendered, built by Trunk). `main.rs` mounts;
//! this file holds the router, the header with its model picker, and the loaded-models context;
//! one page per file under `pages/`; `api.rs` holds the typed fetch helpers; `state.rs` the URL
//! state of every page (all state lives in the URL, so every view is a permalink); `chart.rs`
//! the plotly component; `share.rs` the "Share", "Embed" and "Copy as curl" buttons.
//!
//! With `embed=1` in its URL a page renders for an iframe: no header, only its main figure (a
//! neuron's token charts, a concept's per-layer plot, a steer panel that runs on a click), and a
//! link back to the full page. The flag is read once at start and kept out of the pages' URL
//! state, so every page's parser sees the same query as without it.

use leptos::prelude::*;
use leptos_router::components::{Route, Router, Routes, A};
use leptos_router::hooks::{use_location, use_navigate};
use leptos_router::path;
use shared::ModelSummary;

pub mod api;
pub mod chart;
pub mod gallery;
pub mod pages;
pub mod share;
pub mod sse;
pub mod state;

/// The models the server has loaded, fetched once and shared by every page.
#[derive(Clone, Copy)]
pub struct Models(pub LocalResource<Result<Vec<ModelSummary>, String>>);

impl Models {
    pub fn get() -> Self {
        expect_context()
    }
    /// The model a page shows: the URL's `model`, else the first one loaded. `None` while the
    /// list is loading; an error for an unknown model or when the list failed to load.
    pub fn pick(&self, wanted: Option<&str>) -> Option<Result<ModelSummary, String>> {
        self.0.get().map(|r| {
            let list = r?;
            match wanted {
                Some(w) => list.iter().find(|m| m.id == w).cloned().ok_or_else(|| {
                    format!("unknown model {w:?}; this server has {}", list.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", "))
                }),
                None => list.first().cloned().ok_or_else(|| "the server has no model loaded".to_owned()),
            }
        })
    }
}

/// The current query string, reactive, without the `embed` flag. Rebuilt from the parsed query
/// map: the raw search string of leptos_router 0.8's URL (`use_location().search`) is not
/// updated by client-side navigation.
pub fn use_search() -> Memo<String> {
    let q = leptos_router::hooks::use_query_map();
    Memo::new(move |_| {
        q.with(|q| {
            let mut q = q.clone();
            q.remove(state::EMBED_KEY);
            q.to_query_string()
        })
    })
}

/// Whether the app runs in an iframe embed (`embed=1` in the URL it was opened with).
#[derive(Clone, Copy)]
pub struct Embed(pub bool);

/// Whether this page renders as an embed.
pub fn embedded() -> bool {
    use_context::<Embed>().is_some_and(|e| e.0)
}

/// The footer of an embed: where it comes from, and the full page in a new tab.
#[component]
fn EmbedFooter() -> impl IntoView {
    let loc = use_location();
    let search = use_search();
    // Absolute, so a path such as `//elsewhere/x` cannot make it leave the site.
    let origin = window().location().origin().unwrap_or_default();
    let full = move || format!("{origin}{}{}", loc.pathname.get(), search.get());
    view! {
        <footer class="embed-footer">
            <a href=full target="_blank" rel="noopener">"Open in Flash Interp ↗"</a>
        </footer>
    }
}

#[component]
fn ModelPicker() -> impl IntoView {
    let models = Models::get();
    let loc = use_location();
    let navigate = use_navigate();
    let search = use_search();
    let current = move || state::query_param(&search.get(), "model");
    let on_change = move |ev: leptos::ev::Event| {
        let id = event_target_value(&ev);
        navigate(&state::with_model(&loc.pathname.get_untracked(), &search.get_untracked(), &id), Default::default());
    };
    view! {
        <label class="picker">
            <span class="visually-hidden">"Model"</span>
            <select id="model-picker" on:change=on_change>
                {move || {
                    let cur = current();
                    models
                        .0
                        .get()
                        .and_then(|r| r.ok())
                        .unwrap_or_default()
                        .into_iter()
                        .enumerate()
                        .map(|(i, m)| {
                            let selected = cur.as_deref().map_or(i == 0, |c| c == m.id);
                            view! { <option value=m.id.clone() selected=selected>{m.name.clone()}</option> }
                        })
                        .collect_view()
                }}
            </select>
        </label>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_context(Models(LocalResource::new(|| api::get::<Vec<ModelSummary>>("/api/models"))));
    let embed = state::is_embed(&window().location().search().unwrap_or_default());
    provide_context(Embed(embed));
    // Browser Back/Forward loads the page afresh. With leptos_router 0.8.17 a page rebuilt by a
    // popstate navigation stopped updating its view on later in-page URL changes (the browser test
    // "search → neuron → Back → search again" caught it); a full load of a permalink is always
    // right, and every asset but index.html is cached.
    let _ = window_event_listener(leptos::ev::popstate, |_| {
        let _ = window().location().reload();
    });
    view! {
        <Router>
            <Show when=move || !embed>
            <header class="top">
                <A href="/" attr:class="brand">"Flash Interp"</A>
                <nav>
                    <A href="/">"Search"</A>
                    <A href="/classes">"Classes"</A>
                    <A href="/steer">"Steer"</A>
                    <A href="/compare">"Compare"</A>
                    <A href="/models">"Models"</A>
                    <A href="/about">"About"</A>
                </nav>
                <ModelPicker />
            </header>
            </Show>
            <main class:embed=embed>
                <Routes fallback=|| view! {
                    <h1>"Not found"</h1>
                    <p class="error">"This page does not exist. " <a href="/">"Go to concept search"</a></p>
                }>
                    <Route path=path!("/") view=pages::search::Search />
                    <Route path=path!("/neuron/:layer/:index") view=pages::neuron::Neuron />
                    <Route path=path!("/classes") view=pages::classes::Classes />
                    <Route path=path!("/steer") view=pages::steer::Steer />
                    <Route path=path!("/compare") view=pages::compare::Compare />
                    <Route path=path!("/models") view=pages::home::Home />
                    <Route path=path!("/about") view=pages::about::About />
                </Routes>
                <Show when=move || embed><EmbedFooter /></Show>
            </main>
        </Router>
    }
}

/// A value fetched whenever `key` changes: an effect tracks `key`, runs `fetch` for it and stores
/// the answer, dropping answers that arrive after a newer key. `None` while the first is loading.
pub fn follow<K, T, F>(key: impl Fn() -> K + 'static, fetch: impl Fn(K) -> F + 'static) -> ReadSignal<Option<T>>
where
    K: 'static,
    T: Send + Sync + 'static,
    F: std::future::Future<Output = Option<T>> + 'static,
{
    let (value, set_value) = signal(None::<T>);
    let generation = StoredValue::new(0u64);
    Effect::new(move || {
        let k = key();
        let g = generation.get_value() + 1;
        generation.set_value(g);
        set_value.set(None);
        let fut = fetch(k);
        leptos::task::spawn_local(async move {
            let v = fut.await;
            if generation.try_get_value() == Some(g) {
                set_value.try_set(v);
            }
        });
    });
    value
}

/// Go to a page's link with a change made to its state. The model shown is written into the link
/// (the server's first when the URL names none), so the new link keeps showing it.
pub fn navigator<S: state::ModelPage + Clone + Default + Send + Sync + PartialEq + 'static>(
    st: Memo<Result<S, String>>,
    model: Memo<Option<Result<String, String>>>,
) -> impl Fn(&dyn Fn(&mut S)) + Clone {
    let navigate = use_navigate();
    move |f: &dyn Fn(&mut S)| {
        let mut s = st.get_untracked().unwrap_or_default();
        if s.model_mut().is_none() {
            *s.model_mut() = model.get_untracked().and_then(|m| m.ok());
        }
        f(&mut s);
        navigate(&s.href(), Default::default());
    }
}

/// While the server builds a neuron map: its message and percent (the page retries by itself).
pub fn map_building(message: String, percent: u8) -> AnyView {
    view! {
        <p class="loading" id="map-building" role="status">
            <span class="spinner"></span>{message}" (this page retries by itself) "<progress max="100" value=percent>{format!("{percent}%")}</progress>
        </p>
    }
    .into_any()
}

/// The "View" select of a page over one map view (up, gate, down).
#[component]
pub fn ViewSelect(id: &'static str, current: Signal<shared::View>, on_change: impl FnMut(leptos::ev::Event) + 'static) -> impl IntoView {
    view! {
        <label>
            "View "
            <select id=id on:change=on_change>
                {shared::View::ALL
                    .iter()
                    .map(|v| view! { <option value=v.as_str() selected=move || current.get() == *v>{v.as_str()}</option> })
                    .collect_view()}
            </select>
        </label>
    }
}

/// A loading / error / content switch for a `Result` that may not be there yet.
pub fn status_view<T: Clone + 'static, V: IntoView + 'static>(
    value: Option<Result<T, String>>,
    loading: &'static str,
    content: impl FnOnce(T) -> V,
) -> AnyView {
    match value {
        None => view! { <p class="loading"><span class="spinner"></span>{loading}</p> }.into_any(),
        Some(Err(e)) => view! { <p class="error" role="alert">{e}</p> }.into_any(),
        Some(Ok(v)) => content(v).into_any(),
    }
}

/// A probability as a percentage with about two significant digits (38%, 2.1%, 0.07%, 5.3e-3%).
pub fn percent(p: f32) -> String {
    let pct = p * 100.0;
    if pct >= 10.0 {
        format!("{pct:.0}%")
    } else if pct >= 1.0 {
        format!("{pct:.1}%")
    } else if pct >= 0.01 {
        format!("{pct:.2}%")
    } else if pct == 0.0 {
        "0%".to_owned()
    } else {
        format!("{pct:.1e}%")
    }
}

/// A token shown as text with its spaces visible (" dog" → "␣dog").
pub fn show_token(t: &str) -> String {
    t.replace(' ', "␣").replace('\n', "↵")
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_keeps_two_significant_digits_in_one_unit() {
        let cases = [(0.377, "38%"), (0.021, "2.1%"), (0.000733, "0.07%"), (0.0000531, "5.3e-3%"), (1.0, "100%"), (0.0, "0%")];
        for (p, want) in cases {
            assert_eq!(super::percent(p), want, "{p}");
        }
    }
}
