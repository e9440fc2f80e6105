//! Concept search (the home page): type one or more tokens, see each layer's strongest score and
//! the ranked neurons. All state is in the URL (`?model=…&q=…&view=…`), so every view is a link.

use leptos::prelude::*;
use leptos_router::hooks::{use_navigate, use_query_map};
use leptos_router::NavigateOptions;
use shared::{ModelSummary, SearchResponse};

use crate::api;

/// Split the text box into tokens: commas separate, spaces inside a token are kept (" dog").
pub fn split_tokens(q: &str) -> Vec<String> {
    q.split(',').filter(|t| !t.trim().is_empty()).map(|t| t.to_owned()).collect()
}

/// The search URL of the API for a model, tokens and view.
pub fn search_url(model: &str, tokens: &[String], view: &str) -> String {
    let joined = tokens.join(",");
    format!(
        "/api/models/{}/search?tokens={}&view={}&top=20",
        js_sys::encode_uri_component(model),
        js_sys::encode_uri_component(&joined),
        js_sys::encode_uri_component(view)
    )
}

#[component]
pub fn Search() -> impl IntoView {
    let query = use_query_map();
    let q = move || query.read().get("q").unwrap_or_default();
    let view_name = move || query.read().get("view").unwrap_or_else(|| "up".into());
    let models = LocalResource::new(|| api::get::<Vec<ModelSummary>>("/api/models"));
    let model = move || {
        query.read().get("model").or_else(|| models.get().and_then(|r| r.ok()).and_then(|m| m.first().map(|m| m.id.clone())))
    };
    let results = LocalResource::new(move || {
        let (m, q, v) = (model(), q(), view_name());
        async move {
            let tokens = split_tokens(&q);
            match m {
                Some(m) if !tokens.is_empty() => api::get::<SearchResponse>(&search_url(&m, &tokens, &v)).await.map(Some),
                _ => Ok(None),
            }
        }
    });
    let (draft, set_draft) = signal(String::new());
    Effect::new(move || set_draft.set(q()));
    let navigate = use_navigate();
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let m = model().unwrap_or_default();
        let url = format!(
            "/?model={}&q={}&view={}",
            js_sys::encode_uri_component(&m),
            js_sys::encode_uri_component(&draft.get()),
            js_sys::encode_uri_component(&view_name())
        );
        navigate(&url, NavigateOptions::default());
    };
    view! {
        <h1>"Concept search"</h1>
        <form class="search" on:submit=submit>
            <label>
                "Tokens (comma-separated; spaces matter: \" dog\" is not \"dog\") "
                <input id="q" type="text" placeholder=" dog, dogs, puppy" prop:value=draft
                    on:input=move |ev| set_draft.set(event_target_value(&ev)) />
            </label>
            <button type="submit">"Search"</button>
        </form>
        <Suspense fallback=|| view! { <p class="loading">"Searching every neuron…"</p> }>
            {move || {
                results
                    .get()
                    .map(|r| match r {
                        Ok(Some(s)) => view! { <Results s=s /> }.into_any(),
                        Ok(None) => view! { <p class="hint">"Type a token such as \" dog\" and press Enter."</p> }.into_any(),
                        Err(e) => view! { <p class="error">{e}</p> }.into_any(),
                    })
            }}
        </Suspense>
    }
}

#[component]
fn Results(s: SearchResponse) -> impl IntoView {
    let best: Vec<f32> = s.layers.iter().map(|l| l.iter().fold(0f32, |m, x| m.max(x.abs()))).collect();
    let top = best.iter().cloned().fold(1e-6f32, f32::max);
    view! {
        <section class="layers">
            <h2>"Strongest normalised probability per layer"</h2>
            <ol id="layer-bars" start="0">
                {best
                    .into_iter()
                    .enumerate()
                    .map(|(l, b)| {
                        let width = format!("width: {:.1}%", 100.0 * b / top);
                        view! {
                            <li class="bar-row">
                                <span class="bar-label">{format!("layer {l}")}</span>
                                <span class="bar" style=width></span>
                                <span class="bar-value">{format!("{b:.2}")}</span>
                            </li>
                        }
                    })
                    .collect_view()}
            </ol>
        </section>
        <section>
            <h2>"Strongest neurons"</h2>
            <table id="hits">
                <thead>
                    <tr><th>"layer"</th><th>"neuron"</th><th>"polarity"</th><th>"score"</th><th>"top tokens"</th></tr>
                </thead>
                <tbody>
                    {s.top
                        .into_iter()
                        .map(|h| {
                            view! {
                                <tr class="hit">
                                    <td>{h.layer}</td>
                                    <td>{h.neuron}</td>
                                    <td>{format!("{:?}", h.polarity).to_lowercase()}</td>
                                    <td>{format!("{:.3}", h.score)}</td>
                                    <td class="tokens">{h.top_tokens.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(" ")}</td>
                                </tr>
                            }
                        })
                        .collect_view()}
                </tbody>
            </table>
        </section>
    }
}
