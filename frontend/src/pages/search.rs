//! Concept search (the home page): type one or more tokens (with suggestions from the tokenizer)
//! and see the paper's figure: every neuron's normalised probability, layer after layer, as one
//! interactive plot (hover for the neuron and its top tokens, click to open it), plus the ranked
//! neurons. With "phrase" the text is one multi-token phrase (` Sherlock Holmes`) scored as a
//! whole. "Verify causally" clamps the map's best candidates after a prompt and ranks them by how
//! much they raise the concept's probability (run only on request: it takes a while). All state
//! is in the URL (`?model=…&q=…&phrase=1&view=…&polarity=…&vp=…`); a verification's result is not.

use leptos::prelude::*;
use leptos_router::hooks::use_navigate;
use leptos_router::NavigateOptions;
use plotly::common::{Line, Marker, Mode};
use plotly::layout::{Axis, HoverMode, Margin, Shape, ShapeLayer, ShapeType};
use plotly::{Configuration, Layout, Plot, Scatter};
use shared::{limits, ClampSpec, Polarity, Scale, SearchResponse, SweepPoint, TokenizeResponse, VerifyResponse, View};

use crate::chart::{Chart, Click};
use crate::gallery::Gallery;
use crate::share::{self, ApiRequest, CurlButton, ShareBar};
use crate::state::{self, ModelPage, NeuronState, PolarityChoice, SearchState};
use crate::{api, show_token, status_view, use_search, Models, ViewSelect};

/// Neurons marked (with hover text and their top tokens) in the plot; the table lists the first 20.
const MARKED: usize = 50;
const LISTED: usize = 20;
/// The iframe height of a concept's embed (its per-layer plot).
const EMBED_HEIGHT: u32 = 600;

#[component]
pub fn Search() -> impl IntoView {
    let embed = crate::embedded();
    let search = use_search();
    let st = Memo::new(move |_| state::parse::<SearchState>(&search.get()));
    let models = Models::get();
    let model = Memo::new(move |_| match st.get() {
        Err(e) => Some(Err(e)),
        Ok(s) => models.pick(s.model.as_deref()).map(|r| r.map(|m| m.id)),
    });
    // What the map results depend on (not the verification prompt).
    let query = Memo::new(move |_| st.get().map(|s| s.search_key()));
    // While the server builds the view's neuron map: its message and percent.
    let (building, set_building) = signal(None::<(String, u8)>);
    // The results follow the URL; an answer for an older URL is dropped.
    let results = crate::follow(
        move || (model.get(), query.get()),
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
    let phrase = Memo::new(move |_| st.get().map(|s| s.phrase).unwrap_or(false));
    // Suggestions for the token being typed; for a phrase, how the whole phrase tokenizes.
    let suggestions = LocalResource::new(move || {
        let (m, d, phrase) = (model.get(), draft.get(), phrase.get());
        async move {
            let piece = if phrase { d.clone() } else { state::last_piece(&d).1.to_owned() };
            match m {
                Some(Ok(m)) if !piece.trim().is_empty() => {
                    let as_phrase = if phrase { "&phrase=true" } else { "" };
                    let url = format!("/api/models/{}/tokens?q={}{as_phrase}", state::segment(&m), state::segment(&piece));
                    api::get::<TokenizeResponse>(&url).await.ok().map(|r| (d, r))
                }
                _ => None,
            }
        }
    });

    let go = crate::navigator(st, model);
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
    let go3 = go.clone();
    let set_polarity = move |ev: leptos::ev::Event| {
        let p = event_target_value(&ev);
        go3(&|s| s.polarity = state::parse::<SearchState>(&format!("polarity={p}")).map(|x| x.polarity).unwrap_or_default());
    };
    let go4 = go.clone();
    let set_scale = move |ev: leptos::ev::Event| {
        let v = event_target_value(&ev);
        go4(&|s| s.scale = v.parse().ok());
    };
    // The checkbox keeps what is typed: the same text, read the other way.
    let set_phrase = move |ev: leptos::ev::Event| {
        let on = event_target_checked(&ev);
        go(&|s| {
            s.phrase = on;
            s.q = draft.get_untracked();
        });
    };
    let cur = move || st.get().unwrap_or_default();
    // The map search behind the results, for "Copy as curl".
    let api_request = Signal::derive(move || match (model.get(), query.get()) {
        (Some(Ok(m)), Ok(s)) if !s.tokens().is_empty() => Some(ApiRequest::get(s.api_url(&m, MARKED))),
        _ => None,
    });

    view! {
        {(!embed).then(|| view! { <h1>"Concept search"</h1> })}
        <ShareBar curl=api_request curl_id="curl-search" embed_height=EMBED_HEIGHT />
        {(!embed).then(move || view! {
        <form class="search" on:submit=submit>
            <label class="grow">
                {move || {
                    if phrase.get() {
                        format!("One phrase, tokenized as written (up to {} tokens; spaces matter: \" Sherlock Holmes\")", limits::MAX_PHRASE_TOKENS)
                    } else {
                        "Tokens, comma-separated (spaces matter: \" dog\" is not \"dog\")".to_owned()
                    }
                }}
                <input id="q" type="text" list=move || (!phrase.get()).then_some("token-suggestions") autocomplete="off"
                    placeholder=move || if phrase.get() { " Sherlock Holmes" } else { " dog, dogs, puppy" }
                    prop:value=draft on:input=move |ev| set_draft.set(event_target_value(&ev)) />
            </label>
            <label class="check" title="Score the text as one phrase (the geometric mean of its tokens' normalised probabilities) instead of alternatives">
                <input id="phrase" type="checkbox" prop:checked=phrase on:change=set_phrase />"phrase"
            </label>
            <datalist id="token-suggestions">
                {move || {
                    suggestions
                        .get()
                        .flatten()
                        .filter(|_| !phrase.get())
                        .map(|(d, r)| {
                            r.suggestions
                                .into_iter()
                                .map(|t| view! { <option value=state::complete_with(&d, &t.text)>{show_token(&t.text)}</option> })
                                .collect_view()
                        })
                }}
            </datalist>
            <ViewSelect id="view" current=Signal::derive(move || cur().view) on_change=set_view />
            <label>
                "Polarity "
                <select id="polarity" on:change=set_polarity>
                    <option value="both" selected=move || cur().polarity == PolarityChoice::Both>"stronger"</option>
                    <option value="pos" selected=move || cur().polarity == PolarityChoice::Pos>"pos"</option>
                    <option value="neg" selected=move || cur().polarity == PolarityChoice::Neg>"neg"</option>
                </select>
            </label>
            <label title="How each neuron's logits are scaled before the softmax. Paper: as they are. σ: divided by their standard deviation over the vocabulary, for models whose raw logits are too flat to tell tokens apart (Gemma 3). Auto: the paper's, unless the model's are flat.">
                "Scores "
                <select id="scale" on:change=set_scale>
                    <option value="auto" selected=move || cur().scale.is_none()>"auto"</option>
                    <option value="raw" selected=move || cur().scale == Some(Scale::Raw)>"paper"</option>
                    <option value="std" selected=move || cur().scale == Some(Scale::Std)>"σ-scaled"</option>
                </select>
            </label>
            <button type="submit">"Search"</button>
        </form>
        <TokenHint suggestions=suggestions phrase=phrase />
        })}
        {move || {
            if let (None, Some((message, percent))) = (results.get(), building.get()) {
                return crate::map_building(message, percent);
            }
            status_view(results.get(), "Searching every neuron…", |r| match r {
                Some((m, s)) => {
                    let scale = st.get_untracked().ok().and_then(|s| s.scale);
                    view! { <Results model=m s=s embed=embed scale=scale /> }.into_any()
                }
                None => view! {
                    <p class="hint">
                        "Type a token such as \" dog\" (with its leading space) and press Enter. Try "
                        <a href="/?q=+dog">"␣dog"</a> ", " <a href="/?q=+Paris">"␣Paris"</a> " or "
                        <a href="/?q=+dog,+dogs,+puppy">"␣dog, ␣dogs, ␣puppy"</a> ", or the phrase "
                        <a href="/?q=+Sherlock+Holmes&phrase=1">"␣Sherlock␣Holmes"</a> "."
                    </p>
                    {move || model.get().and_then(|m| m.ok()).map(|m| view! { <Gallery model=m /> })}
                }
                .into_any(),
            })
        }}
        // A new concept or model is a new panel (an old ranking never shows beside new results);
        // a new verification prompt is not.
        {move || match (model.get(), query.get()) {
            (Some(Ok(m)), Ok(q)) if q.concept().is_some() && !embed => Some(view! { <VerifyPanel model=m st=st /> }),
            _ => None,
        }}
    }
}

/// How the piece being typed tokenizes, when it is not one token; for a phrase, its tokens.
#[component]
fn TokenHint(suggestions: LocalResource<Option<(String, TokenizeResponse)>>, phrase: Memo<bool>) -> impl IntoView {
    move || {
        let phrase = phrase.get();
        suggestions.get().flatten().and_then(|(_, r)| {
            let parts = r.tokens.iter().map(|t| show_token(&t.text)).collect::<Vec<_>>().join(" · ");
            let n = r.tokens.len();
            let text = if phrase {
                if n > limits::MAX_PHRASE_TOKENS {
                    format!("The phrase is {n} tokens ({parts}); a phrase takes at most {}.", limits::MAX_PHRASE_TOKENS)
                } else {
                    format!("The phrase is {n} token{} ({parts}).", if n == 1 { "" } else { "s" })
                }
            } else if n > 1 {
                format!("That is {n} tokens ({parts}); pick a single token from the suggestions, or tick \"phrase\".")
            } else {
                return None;
            };
            Some(view! { <p class="hint" id="token-hint">{text}</p> })
        })
    }
}

/// The plot's y axis: what its scores are.
fn score_axis(scale: Scale) -> &'static str {
    match scale {
        Scale::Raw => "p(t) / mean top-100 p",
        Scale::Std => "p(t) / mean top-100 p, σ-scaled",
    }
}

/// A neuron's page, its bars on the search's scale when the search names one.
fn neuron_href(model: &str, layer: usize, neuron: usize, scale: Option<Scale>) -> String {
    NeuronState::new(layer, neuron, Some(model.to_owned())).with_scale(scale).href()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The paper's figure: x runs over every neuron, layer after layer (one shaded band per layer);
/// y is the normalised probability, drawn below zero when the neuron matches in its negative
/// polarity. The strongest neurons are marked, with their top tokens on hover.
fn search_plot(model: &str, s: &SearchResponse, scale: Option<Scale>) -> Plot {
    let n_layers = s.layers.len();
    let d_ff = s.layers.first().map_or(0, |l| l.neurons);
    let total = n_layers * d_ff;
    // The server sends each layer's envelope at screen resolution (every neuron on small models).
    let (mut xs, mut ys, mut text) = (Vec::new(), Vec::new(), Vec::new());
    for (l, layer) in s.layers.iter().enumerate() {
        for (n, y) in layer.points() {
            xs.push(l * d_ff + n);
            ys.push(y);
            text.push(format!("layer {l} · neuron {n}"));
        }
    }
    let all = Scatter::new(xs, ys)
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
    let links: Vec<String> = hits.iter().map(|h| neuron_href(model, h.layer, h.neuron, scale)).collect();
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
        .y_axis(Axis::new().title(score_axis(s.scale)).zero_line(true));
    let mut plot = Plot::new();
    plot.add_trace(all);
    plot.add_trace(marked);
    plot.set_layout(layout);
    plot.set_configuration(Configuration::new().responsive(true).display_logo(false));
    plot
}

#[component]
fn Results(model: String, s: SearchResponse, embed: bool, scale: Option<Scale>) -> impl IntoView {
    let navigate = use_navigate();
    let d_ff = s.layers.first().map_or(0, |l| l.neurons);
    // (layer, neuron) of each point of the "all neurons" trace, in the order it was drawn.
    let drawn: Vec<(usize, usize)> = s.layers.iter().enumerate().flat_map(|(l, layer)| layer.points().map(move |(n, _)| (l, n))).collect();
    let m = model.clone();
    let on_click = Callback::new(move |c: Click| {
        let href = match (c.curve, c.custom) {
            (1, Some(h)) => h,
            (0, _) => match drawn.get(c.point) {
                Some(&(l, n)) => neuron_href(&m, l, n, scale),
                None => return,
            },
            _ => return,
        };
        navigate(&href, Default::default());
    });
    let plot = search_plot(&model, &s, scale);
    let tokens =
        s.tokens.iter().map(|t| format!("{} (id {})", show_token(&t.text), t.id)).collect::<Vec<_>>().join(if s.phrase { " · " } else { ", " });
    let tokens = if s.phrase { format!("phrase {tokens}") } else { tokens };
    let scored = if s.phrase {
        "Every neuron's score for the phrase (the geometric mean of its tokens' normalised probabilities), layer by layer ("
    } else {
        "Every neuron's normalised probability for the concept, layer by layer ("
    };
    let scaled = match s.scale {
        Scale::Raw => "",
        Scale::Std => {
            "Scores are σ-scaled: each neuron's logits are divided by their standard deviation over the vocabulary before the softmax (the \
             default where a model's raw logits are too flat for the paper's scores to tell tokens apart, as Gemma 3's are; \"Scores: paper\" \
             shows the paper's). "
        }
    };
    let strongest = s.top.first().map(|h| format!("Strongest: layer {} neuron {}, score {:.2}.", h.layer, h.neuron, h.score)).unwrap_or_default();
    let envelope = s.layers.iter().find(|l| !l.is_full()).map(|l| {
        format!(" Each layer is drawn as up to {} points that keep its highest and lowest score over every run of neurons.", l.scores.len())
    });
    view! {
        <section class="figure" data-layers=s.layers.len() data-phrase=s.phrase.then_some("1")>
            <h2>{format!("{} view · {}", s.view.as_str(), tokens)}</h2>
            <p class="caption">
                {scored}
                {s.layers.len()} " layers × " {d_ff} " neurons). Above zero: the neuron's direction as it is (pos); below: negated (neg). "
                {scaled} "Hover a point for its top tokens; click to open the neuron. " {strongest} {envelope}
            </p>
            <Chart id="search-plot" plot=plot on_click=on_click />
        </section>
        <section class:hidden=embed>
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
                                let href = neuron_href(&model, h.layer, h.neuron, scale);
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

/// A finished verification, with the search state it was run for (its prompt and concept make
/// the steer links).
#[derive(Debug, Clone, PartialEq)]
struct Verified {
    s: SearchState,
    r: VerifyResponse,
}

/// "Verify causally": a prompt and a button. The button puts the prompt in the URL (`vp`) and
/// POSTs the verification; nothing runs when the page opens.
#[component]
fn VerifyPanel(model: String, st: Memo<Result<SearchState, String>>) -> impl IntoView {
    let navigate = use_navigate();
    let prompt = RwSignal::new(String::new());
    Effect::new(move || prompt.set(st.get().map(|s| s.verify_prompt().to_owned()).unwrap_or_default()));
    // Candidates being clamped while a verification runs.
    let running = RwSignal::new(None::<usize>);
    let building = RwSignal::new(None::<(String, u8)>);
    let result = RwSignal::new(None::<Result<Verified, String>>);
    // The verification the form would send now, for "Copy as curl".
    let cm = model.clone();
    let api_request = Signal::derive(move || {
        let mut s = st.get().ok()?;
        s.vp = prompt.get();
        share::verify_request(&s, &cm).ok()
    });
    let m = model.clone();
    let run = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        if running.get_untracked().is_some() {
            return;
        }
        let Ok(mut s) = st.get_untracked() else { return };
        let p = prompt.get_untracked();
        s.vp = if p.trim().is_empty() || p == state::DEFAULT_VERIFY_PROMPT { String::new() } else { p };
        if s.model.is_none() {
            s.model = Some(m.clone());
        }
        let req = match s.verify_request() {
            Ok(r) => r,
            Err(e) => {
                result.set(Some(Err(e)));
                return;
            }
        };
        if Ok(&s) != st.get_untracked().as_ref() {
            navigate(&s.href(), NavigateOptions { scroll: false, ..Default::default() });
        }
        result.set(None);
        running.set(Some(req.candidates));
        let url = SearchState::verify_url(&m);
        leptos::task::spawn_local(async move {
            let on_progress = move |p| {
                building.try_set(p);
            };
            let r = api::post_waiting::<_, VerifyResponse>(&url, &req, on_progress).await;
            // The panel may be gone (a new concept): then nothing is shown.
            result.try_set(Some(r.map(|r| Verified { s, r })));
            running.try_set(None);
        });
    };
    view! {
        <section id="verify">
            <h2>"Verify causally"</h2>
            <p class="caption">
                "The map ranks neurons by what their weights decode to. Verification tests it: the map's best "
                {state::VERIFY_CANDIDATES}
                " candidates (all views, both polarities) are each clamped over a range scaled to their natural activation, "
                "and the concept's probability right after the prompt (read as plain text; for a phrase, all its tokens in turn) is measured. "
                "Candidates are ranked by the largest rise of log p (nats). It takes a few seconds to half a minute."
            </p>
            <form class="search" id="verify-form" on:submit=run>
                <label class="grow">
                    "Prompt"
                    <input id="vp" type="text" placeholder=state::DEFAULT_VERIFY_PROMPT prop:value=prompt
                        on:input=move |ev| prompt.set(event_target_value(&ev)) />
                </label>
                <button type="submit" id="verify-button" disabled=move || running.get().is_some()>"Verify causally"</button>
                <CurlButton request=api_request id="curl-verify" />
            </form>
            {move || match (running.get(), building.get()) {
                (Some(_), Some((message, percent))) => Some(view! {
                    <p class="loading" id="verify-map-building" role="status">
                        <span class="spinner"></span>{message}" (verification needs every view's map; it retries by itself) "
                        <progress max="100" value=percent>{format!("{percent}%")}</progress>
                    </p>
                }.into_any()),
                (Some(n), None) => Some(view! {
                    <p class="loading" id="verify-status" role="status">
                        <span class="spinner"></span>{format!("Clamping {n} candidates…")}
                    </p>
                }.into_any()),
                (None, _) => result.get().map(|r| {
                    let model = model.clone();
                    status_view(Some(r), "", move |v: Verified| view! { <VerifyResults model=model v=v /> })
                }),
            }}
        </section>
    }
}

/// A probability for the table: fixed for ordinary values, scientific for tiny ones.
fn prob(p: f32) -> String {
    if p != 0.0 && p.abs() < 1e-3 {
        format!("{p:.2e}")
    } else {
        format!("{p:.4}")
    }
}

/// An inline SVG sparkline of a clamp curve (p against the clamp value), the dashed line at
/// `baseline`, the best point marked; its `<title>` lists every point, so hovering shows them.
pub fn sparkline(curve: &[SweepPoint], baseline: f32, best: f32) -> String {
    const W: f32 = 120.0;
    const H: f32 = 28.0;
    const PAD: f32 = 2.5;
    let pts: Vec<&SweepPoint> = curve.iter().filter(|p| p.value.is_finite() && p.prob.is_finite()).collect();
    let fold = |f: fn(f32, f32) -> f32, init: f32, it: &mut dyn Iterator<Item = f32>| it.fold(init, f);
    let (x0, x1) =
        (fold(f32::min, f32::INFINITY, &mut pts.iter().map(|p| p.value)), fold(f32::max, f32::NEG_INFINITY, &mut pts.iter().map(|p| p.value)));
    let ys = || pts.iter().map(|p| p.prob).chain(baseline.is_finite().then_some(baseline));
    let (y0, y1) = (fold(f32::min, f32::INFINITY, &mut ys()), fold(f32::max, f32::NEG_INFINITY, &mut ys()));
    let sx = |x: f32| if x1 > x0 { PAD + (x - x0) / (x1 - x0) * (W - 2.0 * PAD) } else { W / 2.0 };
    let sy = |y: f32| if y1 > y0 { H - PAD - (y - y0) / (y1 - y0) * (H - 2.0 * PAD) } else { H / 2.0 };
    let line = pts.iter().map(|p| format!("{:.1},{:.1}", sx(p.value), sy(p.prob))).collect::<Vec<_>>().join(" ");
    let mut title = format!("p by clamp value (unclamped {}):", prob(baseline));
    for p in curve {
        title.push_str(&format!("\nclamp {:.2} → p {}", p.value, prob(p.prob)));
    }
    let base = if baseline.is_finite() && !pts.is_empty() {
        format!(r##"<line x1="0" x2="{W}" y1="{y:.1}" y2="{y:.1}" stroke="#667" stroke-width="1" stroke-dasharray="2 2"/>"##, y = sy(baseline))
    } else {
        String::new()
    };
    let dot = pts
        .iter()
        .find(|p| p.value == best)
        .map(|p| format!(r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#d8572a"/>"##, sx(p.value), sy(p.prob)))
        .unwrap_or_default();
    format!(
        r##"<svg class="sparkline" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="sweep curve"><title>{title}</title><rect width="{W}" height="{H}" fill="transparent"/>{base}<polyline fill="none" stroke="#d8572a" stroke-width="1.5" points="{line}"/>{dot}</svg>"##
    )
}

#[component]
fn VerifyResults(model: String, v: Verified) -> impl IntoView {
    let Verified { s, r } = v;
    let concept = r.tokens.iter().map(|t| show_token(&t.text)).collect::<Vec<_>>().join(if r.phrase { " · " } else { ", " });
    let what = if r.phrase { format!("p(phrase {concept})") } else { format!("p({concept})") };
    let raised = r.neurons.iter().filter(|n| n.effect > 0.0).count();
    let summary = format!(
        "{what} after \u{201c}{}\u{201d}: {} unclamped. {raised} of {} candidates raise it.",
        s.verify_prompt(),
        prob(r.baseline),
        r.neurons.len()
    );
    let baseline = r.baseline;
    let (map_score, map_score_title) = match r.scale {
        Scale::Raw => ("map score", "The candidate's concept search score: p / mean top-100 p"),
        Scale::Std => {
            ("map score (σ)", "The candidate's concept search score, σ-scaled: p / mean top-100 p of its logits over their standard deviation")
        }
    };
    view! {
        <h3>"Causal ranking"</h3>
        <p class="result" id="verify-summary">{summary}</p>
        <div class="table-wrap">
            <table id="verify-table">
                <thead>
                    <tr>
                        <th>"#"</th><th>"neuron"</th><th>"view"</th><th>"polarity"</th><th>"map rank"</th><th title=map_score_title>{map_score}</th>
                        <th>"best clamp"</th><th>"p at best (unclamped)"</th><th>"effect (nats)"</th><th>"curve"</th><th></th>
                    </tr>
                </thead>
                <tbody>
                    {r.neurons
                        .into_iter()
                        .enumerate()
                        .map(|(i, n)| {
                            let href = neuron_href(&model, n.layer, n.neuron, s.scale);
                            let steer = s.steer_with(&model, ClampSpec { layer: n.layer, neuron: n.neuron, value: n.best_value }).href();
                            let svg = sparkline(&n.curve, baseline, n.best_value);
                            view! {
                                <tr class="verified" data-effect=format!("{:.4}", n.effect)>
                                    <td>{i + 1}</td>
                                    <td><a class="neuron-link" href=href>{format!("{}:{}", n.layer, n.neuron)}</a></td>
                                    <td>{n.view.as_str()}</td>
                                    <td>{if n.polarity == Polarity::Pos { "pos" } else { "neg" }}</td>
                                    <td>{n.map_rank + 1}</td>
                                    <td>{format!("{:.3}", n.map_score)}</td>
                                    <td>{format!("{:.2}", n.best_value)}</td>
                                    <td>{format!("{} ({})", prob(n.best_prob), prob(baseline))}</td>
                                    <td class="effect">{format!("{:+.3}", n.effect)}</td>
                                    <td><span class="sparkline-wrap" inner_html=svg></span></td>
                                    <td><a class="steer-link" href=steer title="Open the steer page with this clamp">"steer"</a></td>
                                </tr>
                            }
                        })
                        .collect_view()}
                </tbody>
            </table>
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_lists_its_points_and_scales_into_the_box() {
        let curve = vec![SweepPoint { value: -10.0, prob: 0.01 }, SweepPoint { value: 0.0, prob: 0.02 }, SweepPoint { value: 10.0, prob: 0.5 }];
        let svg = sparkline(&curve, 0.02, 10.0);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(
            svg.contains(
                "<title>p by clamp value (unclamped 0.0200):\nclamp -10.00 → p 0.0100\nclamp 0.00 → p 0.0200\nclamp 10.00 → p 0.5000</title>"
            ),
            "{svg}"
        );
        assert!(svg.contains(r#"points="2.5,25.5 60.0,25.0 117.5,2.5""#), "{svg}");
        assert!(svg.contains("<circle cx=\"117.5\""), "{svg}");
        // Flat, empty or non-finite curves still draw.
        assert!(sparkline(&[SweepPoint { value: 1.0, prob: 0.1 }], 0.1, 1.0).contains("points=\"60.0,14.0\""));
        assert!(sparkline(&[], f32::NAN, 0.0).contains("points=\"\""));
        assert!(!sparkline(&[SweepPoint { value: f32::NAN, prob: 1.0 }], 0.5, 0.0).contains("NaN,"));
    }

    #[test]
    fn probabilities_stay_readable() {
        assert_eq!(prob(0.12345), "0.1235");
        assert_eq!(prob(0.0), "0.0000");
        assert_eq!(prob(0.00001234), "1.23e-5");
    }
}
