//! Concept search (the home page): type one or more tokens (with suggestions from the tokenizer)
//! and see the paper's figure: every neuron's normalised probability, layer after layer, as one
//! interactive plot (hover for the neuron and its top tokens, click to open it), plus the ranked
//! neurons. All state is in the URL (`?model=…&q=…&view=…&polarity=…`).

use leptos::prelude::*;
use leptos_router::hooks::use_navigate;
use plotly::common::{Line, Marker, Mode};
use plotly::layout::{Axis, HoverMode, Margin, Shape, ShapeLayer, ShapeType};
use plotly::{Configuration, Layout, Plot, Scatter};
use shared::{Polarity, SearchResponse, TokenizeResponse, View};

use crate::chart::{Chart, Click};
use crate::state::{self, NeuronState, PolarityChoice, SearchState};
use crate::{api, show_token, status_view, use_search, Models};

/// Neurons marked (with hover text and their top tokens) in the plot; the table lists the first 20.
const MARKED: usize = 50;
const LISTED: usize = 20;

#[component]
pub fn Search() -> impl IntoView {
    let search = use_search();
    let st = Memo::new(move |_| state::parse::<SearchState>(&search.get()));
    let models = Models::get();
    let model = Memo::new(move |_| match st.get() {
        Err(e) => Some(Err(e)),
        Ok(s) => models.pick(s.model.as_deref()).map(|r| r.map(|m| m.id)),
    });
    // While the server builds the view's neuron map: its message and percent.
    let (building, set_building) = signal(None::<(String, u8)>);
    // The results follow the URL; an answer for an older URL is dropped.
    let results = crate::follow(
        move || (model.get(), st.get()),
        move |(m, s)| async move {
            match (m, s) {
                (None, _) => None,
                (Some(Err(e)), _) | (_, Err(e)) => Some(Err(e)),
                (Some(Ok(m)), Ok(s)) if !s.tokens().is_empty() => {
                    let on_progress = move |p| set_building.set(p);
                    Some(api::get_waiting::<SearchResponse>(&s.api_url(&m, MARKED), on_progress).await.map(|r| Some((m, r))))
                }
                _ => Some(Ok(None)),
            }
        },
    );
    let (draft, set_draft) = signal(String::new());
    Effect::new(move || set_draft.set(st.get().map(|s| s.q).unwrap_or_default()));
    let suggestions = LocalResource::new(move || {
        let (m, d) = (model.get(), draft.get());
        async move {
            let piece = state::last_piece(&d).1.to_owned();
            match m {
                Some(Ok(m)) if !piece.trim().is_empty() => {
                    let url = format!("/api/models/{}/tokens?q={}", state::segment(&m), state::segment(&piece));
                    api::get::<TokenizeResponse>(&url).await.ok().map(|r| (d, r))
                }
                _ => None,
            }
        }
    });

    let navigate = use_navigate();
    let go = move |f: &dyn Fn(&mut SearchState)| {
        let mut s = st.get_untracked().unwrap_or_default();
        if s.model.is_none() {
            s.model = model.get_untracked().and_then(|m| m.ok());
        }
        f(&mut s);
        navigate(&s.href(), Default::default());
    };
    let go1 = go.clone();
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        go1(&|s| s.q = draft.get_untracked());
    };
    let go2 = go.clone();
    let set_view = move |ev: leptos::ev::Event| {
        let v = event_target_value(&ev);
        go2(&|s| s.view = v.parse().unwrap_or(View::Up));
    };
    let set_polarity = move |ev: leptos::ev::Event| {
        let p = event_target_value(&ev);
        go(&|s| s.polarity = state::parse::<SearchState>(&format!("polarity={p}")).map(|x| x.polarity).unwrap_or_default());
    };
    let cur = move || st.get().unwrap_or_default();

    view! {
        <h1>"Concept search"</h1>
        <form class="search" on:submit=submit>
            <label class="grow">
                "Tokens, comma-separated (spaces matter: \" dog\" is not \"dog\")"
                <input id="q" type="text" list="token-suggestions" autocomplete="off" placeholder=" dog, dogs, puppy"
                    prop:value=draft on:input=move |ev| set_draft.set(event_target_value(&ev)) />
            </label>
            <datalist id="token-suggestions">
                {move || {
                    suggestions
                        .get()
                        .flatten()
                        .map(|(d, r)| {
                            r.suggestions
                                .into_iter()
                                .map(|t| view! { <option value=state::complete_with(&d, &t.text)>{show_token(&t.text)}</option> })
                                .collect_view()
                        })
                }}
            </datalist>
            <label>
                "View "
                <select id="view" on:change=set_view>
                    {View::ALL
                        .iter()
                        .map(|v| view! { <option value=v.as_str() selected=move || cur().view == *v>{v.as_str()}</option> })
                        .collect_view()}
                </select>
            </label>
            <label>
                "Polarity "
                <select id="polarity" on:change=set_polarity>
                    <option value="both" selected=move || cur().polarity == PolarityChoice::Both>"stronger"</option>
                    <option value="pos" selected=move || cur().polarity == PolarityChoice::Pos>"pos"</option>
                    <option value="neg" selected=move || cur().polarity == PolarityChoice::Neg>"neg"</option>
                </select>
            </label>
            <button type="submit">"Search"</button>
        </form>
        <TokenHint suggestions=suggestions />
        {move || {
            if let (None, Some((message, percent))) = (results.get(), building.get()) {
                return view! {
                    <p class="loading" id="map-building" role="status">
                        <span class="spinner"></span>{message}" (this page retries by itself) "<progress max="100" value=percent>{format!("{percent}%")}</progress>
                    </p>
                }
                .into_any();
            }
            status_view(results.get(), "Searching every neuron…", |r| match r {
                Some((m, s)) => view! { <Results model=m s=s /> }.into_any(),
                None => view! {
                    <p class="hint">
                        "Type a token such as \" dog\" (with its leading space) and press Enter. Try "
                        <a href="/?q=+dog">"␣dog"</a> ", " <a href="/?q=+Paris">"␣Paris"</a> " or "
                        <a href="/?q=+dog,+dogs,+puppy">"␣dog, ␣dogs, ␣puppy"</a> "."
                    </p>
                }
                .into_any(),
            })
        }}
    }
}

/// How the piece being typed tokenizes, when it is not one token.
#[component]
fn TokenHint(suggestions: LocalResource<Option<(String, TokenizeResponse)>>) -> impl IntoView {
    move || {
        suggestions.get().flatten().and_then(|(_, r)| {
            (r.tokens.len() > 1).then(|| {
                let parts = r.tokens.iter().map(|t| show_token(&t.text)).collect::<Vec<_>>().join(" · ");
                view! { <p class="hint" id="token-hint">{format!("That is {} tokens ({parts}); pick a single token from the suggestions.", r.tokens.len())}</p> }
            })
        })
    }
}

fn neuron_href(model: &str, layer: usize, neuron: usize) -> String {
    NeuronState::new(layer, neuron, Some(model.to_owned())).href()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The paper's figure: x runs over every neuron, layer after layer (one shaded band per layer);
/// y is the normalised probability, drawn below zero when the neuron matches in its negative
/// polarity. The strongest neurons are marked, with their top tokens on hover.
fn search_plot(model: &str, s: &SearchResponse) -> Plot {
    let n_layers = s.layers.len();
    let d_ff = s.layers.first().map_or(0, |l| l.len());
    let total = n_layers * d_ff;
    let ys: Vec<f32> = s.layers.iter().flatten().cloned().collect();
    let text: Vec<String> = (0..total).map(|i| format!("layer {} · neuron {}", i / d_ff, i % d_ff)).collect();
    let all = Scatter::new((0..total).collect::<Vec<_>>(), ys)
        .mode(Mode::Lines)
        .line(Line::new().width(1.0).color("#7b8bb0"))
        .text_array(text)
        .hover_template("%{text}<br>score %{y:.3f}<extra></extra>")
        .name("all neurons");
    let hits = &s.top;
    let hx: Vec<usize> = hits.iter().map(|h| h.layer * d_ff + h.neuron).collect();
    let hy: Vec<f32> = hits.iter().map(|h| h.score * h.polarity.sign()).collect();
    let htext: Vec<String> = hits
        .iter()
        .map(|h| {
            let toks = h.top_tokens.iter().take(6).map(|t| html_escape(&show_token(t))).collect::<Vec<_>>().join("  ");
            format!("<b>layer {} · neuron {}</b> ({})<br>top: {toks}", h.layer, h.neuron, if h.polarity == Polarity::Pos { "pos" } else { "neg" })
        })
        .collect();
    let links: Vec<String> = hits.iter().map(|h| neuron_href(model, h.layer, h.neuron)).collect();
    let colors: Vec<&str> = hits.iter().map(|h| if h.polarity == Polarity::Pos { "#d8572a" } else { "#3b6fd8" }).collect();
    let marked = Scatter::new(hx, hy)
        .mode(Mode::Markers)
        .marker(Marker::new().size(7).color_array(colors))
        .text_array(htext)
        .custom_data(links)
        .hover_template("%{text}<br>score %{y:.3f}<br><i>click to open</i><extra></extra>")
        .name("strongest");
    let bands: Vec<Shape> = (0..n_layers)
        .filter(|l| l % 2 == 1)
        .map(|l| {
            Shape::new()
                .shape_type(ShapeType::Rect)
                .x_ref("x")
                .y_ref("paper")
                .x0((l * d_ff) as f64 - 0.5)
                .x1(((l + 1) * d_ff) as f64 - 0.5)
                .y0(0.0)
                .y1(1.0)
                .fill_color("rgba(29,35,48,0.05)")
                .line(plotly::layout::ShapeLine::new().width(0.0))
                .layer(ShapeLayer::Below)
        })
        .collect();
    let ticks: Vec<usize> = (0..n_layers).collect();
    let layout = Layout::new()
        .height(380)
        .margin(Margin::new().left(50).right(10).top(10).bottom(50))
        .show_legend(false)
        .hover_mode(HoverMode::Closest)
        .shapes(bands)
        .x_axis(
            Axis::new()
                .title("layer (each band is one layer's neurons)")
                .tick_values(ticks.iter().map(|&l| (l * d_ff + d_ff / 2) as f64).collect())
                .tick_text(ticks.iter().map(|l| l.to_string()).collect())
                .show_grid(false)
                .zero_line(false)
                .range(vec![-0.5, total as f64 - 0.5]),
        )
        .y_axis(Axis::new().title("p(t) / mean top-100 p").zero_line(true));
    let mut plot = Plot::new();
    plot.add_trace(all);
    plot.add_trace(marked);
    plot.set_layout(layout);
    plot.set_configuration(Configuration::new().responsive(true).display_logo(false));
    plot
}

#[component]
fn Results(model: String, s: SearchResponse) -> impl IntoView {
    let navigate = use_navigate();
    let d_ff = s.layers.first().map_or(1, |l| l.len().max(1));
    let m = model.clone();
    let on_click = Callback::new(move |c: Click| {
        let href = match (c.curve, c.custom) {
            (1, Some(h)) => h,
            _ => neuron_href(&m, c.point / d_ff, c.point % d_ff),
        };
        navigate(&href, Default::default());
    });
    let plot = search_plot(&model, &s);
    let tokens = s.tokens.iter().map(|t| format!("{} (id {})", show_token(&t.text), t.id)).collect::<Vec<_>>().join(", ");
    let strongest = s.top.first().map(|h| format!("strongest: layer {} neuron {}, score {:.2}", h.layer, h.neuron, h.score)).unwrap_or_default();
    view! {
        <section class="figure" data-layers=s.layers.len()>
            <h2>{format!("{} view · {}", s.view.as_str(), tokens)}</h2>
            <p class="caption">
                "Every neuron's normalised probability for the concept, layer by layer ("
                {s.layers.len()} " layers × " {d_ff} " neurons). Above zero: the neuron's direction as it is (pos); below: negated (neg). "
                "Hover a point for its top tokens; click to open the neuron. " {strongest}
            </p>
            <Chart id="search-plot" plot=plot on_click=on_click />
        </section>
        <section>
            <h2>"Strongest neurons"</h2>
            <div class="table-wrap">
                <table id="hits">
                    <thead>
                        <tr><th>"#"</th><th>"neuron"</th><th>"polarity"</th><th>"score"</th><th>"top tokens"</th></tr>
                    </thead>
                    <tbody>
                        {s.top
                            .into_iter()
                            .take(LISTED)
                            .enumerate()
                            .map(|(i, h)| {
                                let href = neuron_href(&model, h.layer, h.neuron);
                                view! {
                                    <tr class="hit">
                                        <td>{i + 1}</td>
                                        <td><a class="neuron-link" href=href>{format!("{}:{}", h.layer, h.neuron)}</a></td>
                                        <td>{if h.polarity == Polarity::Pos { "pos" } else { "neg" }}</td>
                                        <td>{format!("{:.3}", h.score)}</td>
                                        <td class="tokens">{h.top_tokens.iter().map(|t| show_token(t)).collect::<Vec<_>>().join("  ")}</td>
                                    </tr>
                                }
                            })
                            .collect_view()}
                    </tbody>
                </table>
            </div>
        </section>
    }
}
