//! Neuron page, `/neuron/{layer}/{index}?model=…`: the neuron's top and bottom tokens in each
//! view as charts, its natural activation statistics, the most similar neurons, and a clamp sweep
//! (p(target) against the clamp value, the paper's figure 3) whose settings live in the URL.
//! "Steer with this neuron" opens the steer page prefilled.

use leptos::prelude::*;
use leptos_router::hooks::{use_navigate, use_params_map};
use plotly::common::{Line, Marker, Mode, Orientation};
use plotly::configuration::DisplayModeBar;
use plotly::layout::{Axis, AxisType, Margin, Shape, ShapeLine, ShapeType};
use plotly::{Bar, Configuration, Layout, Plot, Scatter};
use shared::{NeuronDetail, Polarity, SweepResponse, ViewTokens};

use crate::chart::Chart;
use crate::share::{ApiRequest, CurlButton, ShareBar};
use crate::state::{self, ClassesState, ModelPage, NeuronState, SearchState, SteerState};
use crate::{api, show_token, status_view, use_search, Models};

/// Tokens shown per view and polarity.
const TOKENS: usize = 10;

/// The iframe height of a neuron's embed (its token charts).
const EMBED_HEIGHT: u32 = 800;

#[component]
pub fn Neuron() -> impl IntoView {
    let embed = crate::embedded();
    let params = use_params_map();
    let search = use_search();
    let st = Memo::new(move |_| {
        let p = params.read();
        let num = |k: &str| {
            p.get(k).and_then(|v| v.parse::<usize>().ok()).ok_or_else(|| format!("{:?} is not a neuron address", p.get(k).unwrap_or_default()))
        };
        NeuronState::parse(num("layer")?, num("index")?, &search.get())
    });
    let models = Models::get();
    let model = Memo::new(move |_| match st.get() {
        Err(e) => Some(Err(e)),
        Ok(s) => models.pick(s.model.as_deref()),
    });
    let detail = LocalResource::new(move || {
        let (m, s) = (model.get(), st.get());
        async move {
            let (m, s) = match (m?, s) {
                (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
                (Ok(m), Ok(s)) => (m, s),
            };
            Some(api::get::<NeuronDetail>(&s.detail_url(&m.id, TOKENS)).await.map(|d| (m.id, d)))
        }
    });
    // The neuron's detail, for "Copy as curl".
    let api_request = Signal::derive(move || match (model.get(), st.get()) {
        (Some(Ok(m)), Ok(s)) => Some(ApiRequest::get(s.detail_url(&m.id, TOKENS))),
        _ => None,
    });
    view! {
        {move || match st.get() {
            Ok(s) => view! { <h1>{format!("Neuron {}:{}", s.layer, s.neuron)}</h1> }.into_any(),
            Err(_) => view! { <h1>"Neuron"</h1> }.into_any(),
        }}
        <ShareBar curl=api_request curl_id="curl-neuron" embed_height=EMBED_HEIGHT />
        {move || status_view(detail.get().flatten(), "Decoding the neuron…", move |(m, d)| {
            let scale = st.get_untracked().ok().and_then(|s| s.scale);
            view! { <Detail model=m d=d embed=embed scale=scale /> }
        })}
        {move || (!embed).then(|| st.get().ok().zip(model.get().and_then(|m| m.ok())).map(|(s, m)| view! { <SweepPanel s=s model=m.id /> }))}
    }
}

fn token_chart(vt: &ViewTokens, scale: shared::Scale) -> Plot {
    let axis = match scale {
        shared::Scale::Raw => "p / mean top-100 p",
        shared::Scale::Std => "p / mean top-100 p, σ-scaled",
    };
    // Horizontal bars, strongest on top.
    let toks: Vec<_> = vt.tokens.iter().take(TOKENS).rev().collect();
    let labels: Vec<String> = toks.iter().enumerate().map(|(i, t)| format!("{}{}", show_token(&t.text), "\u{200b}".repeat(i))).collect();
    let bar = Bar::new(toks.iter().map(|t| t.norm).collect::<Vec<_>>(), labels)
        .orientation(Orientation::Horizontal)
        .marker(Marker::new().color(if vt.polarity == Polarity::Pos { "#d8572a" } else { "#3b6fd8" }))
        .hover_template("%{y}<br>normalised p %{x:.3f}<extra></extra>");
    let mut plot = Plot::new();
    plot.add_trace(bar);
    plot.set_layout(
        Layout::new()
            .height(260)
            .margin(Margin::new().left(110).right(10).top(10).bottom(35))
            .x_axis(Axis::new().title(axis))
            .y_axis(Axis::new().auto_margin(true)),
    );
    // Small charts: no mode bar over the top bar.
    plot.set_configuration(Configuration::new().responsive(true).display_logo(false).display_mode_bar(DisplayModeBar::False));
    plot
}

#[component]
fn Detail(model: String, d: NeuronDetail, embed: bool, scale: Option<shared::Scale>) -> impl IntoView {
    let (layer, neuron) = (d.layer, d.neuron);
    // What the neuron writes: the down view's top token, the word a steered answer should show.
    let writes =
        d.views.iter().find(|v| v.view == shared::View::Down && v.polarity == Polarity::Pos).and_then(|v| v.tokens.first()).map(|t| t.text.clone());
    let reads = d.views.iter().find(|v| v.view == shared::View::Up).and_then(|v| v.tokens.first()).map(|t| t.text.clone());
    let strength = (d.activation.max.abs().max(d.activation.min.abs()) * 2.0).clamp(4.0, 50.0).round();
    let mut steer = SteerState { model: Some(model.clone()), word: writes.clone().unwrap_or_default().trim().to_owned(), ..Default::default() };
    steer.set_clamps(&[shared::ClampSpec { layer, neuron, value: strength }]);
    let search_link = reads.map(|t| SearchState { model: Some(model.clone()), q: t, scale, ..Default::default() }.href());
    let a = d.activation;
    let views = view! {
        <section>
            <h2>"What it reads and writes"</h2>
            <p class="caption">
                "Top tokens of each direction decoded through the unembedding: pos as it is, neg negated. "
                "up and gate are what the neuron reads; down is what it writes. "
                {(d.scale == shared::Scale::Std).then_some(
                    "Bars are σ-scaled normalised probabilities (each direction's logits over their standard deviation), as this model's search scores them.",
                )}
            </p>
            <div class="views">
                {d.views
                    .iter()
                    .map(|vt| {
                        let id = format!("tokens-{}-{}", vt.view.as_str(), if vt.polarity == Polarity::Pos { "pos" } else { "neg" });
                        let title = format!("{} · {}", vt.view.as_str(), if vt.polarity == Polarity::Pos { "pos (top)" } else { "neg (bottom)" });
                        let plot = token_chart(vt, d.scale);
                        view! {
                            <figure class="tokens-chart">
                                <figcaption>{title}</figcaption>
                                <Chart id=id plot=plot />
                            </figure>
                        }
                    })
                    .collect_view()}
            </div>
        </section>
    };
    if embed {
        return views.into_any();
    }
    view! {
        <p class="actions">
            <a class="button" id="steer-link" href=steer.href()>"Steer with this neuron"</a>
            {search_link.map(|h| view! { <a class="button secondary" href=h>"Search its top token"</a> })}
        </p>
        {views}
        <section class="two-col">
            <div>
                <h2>"Natural activation"</h2>
                <p class="caption">"act(gate)·up at every position of a fixed set of sample prompts."</p>
                <table class="stats" id="activation">
                    <tbody>
                        <tr><th>"mean"</th><td>{format!("{:.3}", a.mean)}</td></tr>
                        <tr><th>"std"</th><td>{format!("{:.3}", a.std)}</td></tr>
                        <tr><th>"min"</th><td>{format!("{:.3}", a.min)}</td></tr>
                        <tr><th>"max"</th><td>{format!("{:.3}", a.max)}</td></tr>
                        <tr><th>"positions"</th><td>{a.positions}</td></tr>
                    </tbody>
                </table>
                {(!d.classes.is_empty()).then(|| {
                    let classes_href = ClassesState { model: Some(model.clone()), ..Default::default() }.href();
                    view! {
                        <h2>"Weight statistics"</h2>
                        <p class="caption">
                            "Moments of its logits over the vocabulary, per view, and the "
                            <a href=classes_href>"class"</a>
                            " they give (Gurnee et al. 2024)."
                        </p>
                        <table class="stats" id="moments">
                            <thead><tr><th>"view"</th><th>"class"</th><th>"kurtosis"</th><th>"skew"</th><th>"std"</th></tr></thead>
                            <tbody>
                                {d.classes
                                    .iter()
                                    .map(|c| {
                                        let m = c.moments;
                                        view! {
                                            <tr data-view=c.view.as_str()>
                                                <td>{c.view.as_str()}</td>
                                                <td class="class">{c.class.as_str()}</td>
                                                <td>{format!("{:.1}", m.kurtosis)}</td>
                                                <td>{format!("{:+.2}", m.skew)}</td>
                                                <td>{format!("{:.3}", m.std)}</td>
                                            </tr>
                                        }
                                    })
                                    .collect_view()}
                            </tbody>
                        </table>
                    }
                })}
            </div>
            <div>
                <h2>"Similar neurons"</h2>
                <p class="caption">"Largest |cosine| between up rows, all layers."</p>
                <table class="stats" id="similar">
                    <tbody>
                        {d.similar
                            .iter()
                            .map(|n| {
                                let href = NeuronState::new(n.layer, n.neuron, Some(model.clone())).with_scale(scale).href();
                                view! { <tr><td><a href=href>{format!("{}:{}", n.layer, n.neuron)}</a></td><td>{format!("cos {:+.3}", n.cosine)}</td></tr> }
                            })
                            .collect_view()}
                    </tbody>
                </table>
            </div>
        </section>
    }
    .into_any()
}

fn sweep_plot(r: &SweepResponse, log: bool) -> Plot {
    let xs: Vec<f32> = r.points.iter().map(|p| p.value).collect();
    let ys: Vec<f32> = r.points.iter().map(|p| p.prob).collect();
    let (x0, x1) = (xs.first().copied().unwrap_or(0.0), xs.last().copied().unwrap_or(1.0));
    let curve = Scatter::new(xs, ys)
        .mode(Mode::LinesMarkers)
        .line(Line::new().color("#d8572a").width(2.0))
        .hover_template("clamp %{x:.2f}<br>p = %{y:.4f}<extra></extra>")
        .name("clamped");
    fn dashed(x0: f64, x1: f64, y0: f64, y1: f64, yref: &str, color: &'static str) -> Shape {
        Shape::new()
            .shape_type(ShapeType::Line)
            .x_ref("x")
            .y_ref(yref)
            .x0(x0)
            .x1(x1)
            .y0(y0)
            .y1(y1)
            .line(ShapeLine::new().color(color).width(1.5).dash(plotly::common::DashType::Dash))
    }
    let nat = r.natural_value as f64;
    let mut shapes = vec![dashed(x0 as f64, x1 as f64, r.baseline as f64, r.baseline as f64, "y", "#667")];
    if nat >= x0 as f64 && nat <= x1 as f64 {
        shapes.push(dashed(nat, nat, 0.0, 1.0, "paper", "#3b6fd8"));
    }
    let mut plot = Plot::new();
    plot.add_trace(curve);
    plot.set_layout(
        Layout::new()
            .height(340)
            .margin(Margin::new().left(60).right(10).top(10).bottom(45))
            .show_legend(false)
            .shapes(shapes)
            .x_axis(Axis::new().title("clamp value"))
            .y_axis(Axis::new().title(format!("p({})", show_token(&r.target_text)).as_str()).type_(if log {
                AxisType::Log
            } else {
                AxisType::Linear
            })),
    );
    plot.set_configuration(Configuration::new().responsive(true).display_logo(false));
    plot
}

/// The clamp sweep: its form edits a draft; "Run" puts the settings in the URL, which runs it.
#[component]
fn SweepPanel(s: NeuronState, model: String) -> impl IntoView {
    let navigate = use_navigate();
    // The sweep's API request: none without a target; an error for settings the API refuses.
    let url = NeuronState::sweep_url(&model);
    let request = (!s.target.is_empty()).then(|| s.sweep_request());
    let api_request = Signal::stored(request.clone().and_then(|r| r.ok()).map(|r| ApiRequest::post(url.clone(), &r)));
    let target = RwSignal::new(s.target.clone());
    let prompt = RwSignal::new(s.sweep_prompt().to_owned());
    let from = RwSignal::new(s.from.to_string());
    let to = RwSignal::new(s.to.to_string());
    let steps = RwSignal::new(s.steps.to_string());
    let form_error = RwSignal::new(None::<String>);
    let base = s.clone();
    let nav = navigate.clone();
    let run = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        let parse = |x: String, what: &str| x.trim().parse::<f32>().map_err(|_| format!("{what} must be a number"));
        let next = (|| -> Result<NeuronState, String> {
            let mut n = base.clone();
            n.target = target.get_untracked();
            if n.target.is_empty() {
                return Err("type the target token, e.g. \" dog\"".into());
            }
            n.prompt = Some(prompt.get_untracked()).filter(|p| p != state::DEFAULT_SWEEP_PROMPT);
            n.from = parse(from.get_untracked(), "from")?;
            n.to = parse(to.get_untracked(), "to")?;
            n.steps = steps.get_untracked().trim().parse().map_err(|_| "steps must be a whole number".to_string())?;
            n.sweep_values()?;
            if n.model.is_none() {
                n.model = Some(model.clone());
            }
            Ok(n)
        })();
        match next {
            Ok(n) => {
                form_error.set(None);
                nav(&n.href(), Default::default());
            }
            Err(e) => form_error.set(Some(e)),
        }
    };
    let log_state = s.clone();
    let toggle_log = move |_| {
        let mut n = log_state.clone();
        n.log = !n.log;
        navigate(&n.href(), leptos_router::NavigateOptions { scroll: false, ..Default::default() });
    };
    let log = s.log;
    let sweep = LocalResource::new(move || {
        let (url, request) = (url.clone(), request.clone());
        async move {
            match request? {
                Ok(req) => Some(api::post::<_, SweepResponse>(&url, &req).await),
                Err(e) => Some(Err(e)),
            }
        }
    });
    view! {
        <section id="sweep">
            <h2>"Clamp sweep"</h2>
            <p class="caption">
                "Force this neuron's activation to each value at every position and read p(target) for the next token. "
                "The dashed grey line is the unclamped p; the dashed blue line the neuron's natural activation at the last position."
            </p>
            <form class="sweep" on:submit=run>
                <label class="grow">"Prompt"<input id="sweep-prompt" type="text" prop:value=prompt on:input=move |ev| prompt.set(event_target_value(&ev)) /></label>
                <label>"Target token"<input id="sweep-target" type="text" placeholder=" dog" prop:value=target on:input=move |ev| target.set(event_target_value(&ev)) /></label>
                <label>"From"<input id="sweep-from" type="number" step="any" prop:value=from on:input=move |ev| from.set(event_target_value(&ev)) /></label>
                <label>"To"<input id="sweep-to" type="number" step="any" prop:value=to on:input=move |ev| to.set(event_target_value(&ev)) /></label>
                <label>"Steps"<input id="sweep-steps" type="number" min="2" max=shared::limits::MAX_SWEEP_VALUES prop:value=steps on:input=move |ev| steps.set(event_target_value(&ev)) /></label>
                <button type="submit">"Run sweep"</button>
            </form>
            {move || form_error.get().map(|e| view! { <p class="error" role="alert">{e}</p> })}
            <label class="check"><input id="sweep-log" type="checkbox" prop:checked=log on:change=toggle_log />"log scale"</label>
            <div class="share-bar"><CurlButton request=api_request id="curl-sweep" /></div>
            {move || match sweep.get().flatten() {
                None if s.target.is_empty() => view! { <p class="hint">"Pick a target token and press Run sweep."</p> }.into_any(),
                r => status_view(r, "Running the sweep…", move |r: SweepResponse| {
                    let plot = sweep_plot(&r, log);
                    let best = r.points.iter().cloned().fold(None::<shared::SweepPoint>, |b, p| match b {
                        Some(b) if b.prob >= p.prob => Some(b),
                        _ => Some(p),
                    });
                    view! {
                        <p class="result" id="sweep-summary">
                            {format!(
                                "p({}) unclamped {:.4}; natural activation {:.2}; highest {:.4} at clamp {:.1}.",
                                show_token(&r.target_text),
                                r.baseline,
                                r.natural_value,
                                best.as_ref().map_or(0.0, |b| b.prob),
                                best.as_ref().map_or(0.0, |b| b.value),
                            )}
                        </p>
                        <Chart id="sweep-plot" plot=plot />
                    }
                }),
            }}
        </section>
    }
}
