//! Neuron classes, `/classes?model=…&view=…&class=…`: the weight-statistics classes of Gurnee et
//! al. 2024 ("Universal Neurons in GPT2 Language Models") read from the moments of each neuron's
//! decoded direction over the vocabulary: per-layer counts as a stacked bar chart, and the
//! strongest neurons of one class. All state is in the URL.

use leptos::prelude::*;
use leptos_router::hooks::use_navigate;
use plotly::common::{Marker, Orientation};
use plotly::layout::{Axis, BarMode, HoverMode, Legend, Margin};
use plotly::{Bar, Configuration, Layout, Plot};
use shared::{ClassesResponse, NeuronClass, View};

use crate::chart::{Chart, Click};
use crate::share::{ApiRequest, ShareBar};
use crate::state::{self, ClassesState, ModelPage, NeuronState};
use crate::{api, show_token, status_view, use_search, Models, ViewSelect};

/// Neurons of the chosen class listed in the table.
const LISTED: usize = 30;
/// Top tokens shown per listed neuron.
const TOKENS: usize = 8;

/// The three classes the chart counts, with their colours.
const COUNTED: [(NeuronClass, &str); 3] =
    [(NeuronClass::Prediction, "#d8572a"), (NeuronClass::Suppression, "#3b6fd8"), (NeuronClass::Partition, "#7b8bb0")];

#[component]
pub fn Classes() -> impl IntoView {
    let search = use_search();
    let st = Memo::new(move |_| state::parse::<ClassesState>(&search.get()));
    let models = Models::get();
    let model = Memo::new(move |_| match st.get() {
        Err(e) => Some(Err(e)),
        Ok(s) => models.pick(s.model.as_deref()).map(|r| r.map(|m| m.id)),
    });
    // While the server builds the view's neuron map: its message and percent.
    let (building, set_building) = signal(None::<(String, u8)>);
    let results = crate::follow(
        move || (model.get(), st.get()),
        move |(m, s)| async move {
            match (m, s) {
                (None, _) => None,
                (Some(Err(e)), _) | (_, Err(e)) => Some(Err(e)),
                (Some(Ok(m)), Ok(s)) => {
                    let on_progress = move |p| set_building.set(p);
                    Some(api::get_waiting::<ClassesResponse>(&s.api_url(&m, LISTED), on_progress).await.map(|r| (m, r)))
                }
            }
        },
    );

    let go = crate::navigator(st, model);
    let go1 = go.clone();
    let set_view = move |ev: leptos::ev::Event| {
        let v = event_target_value(&ev);
        go1(&|s| s.view = v.parse().unwrap_or(View::Down));
    };
    let set_class = move |ev: leptos::ev::Event| {
        let c = event_target_value(&ev);
        go(&|s| s.class = c.parse().unwrap_or(NeuronClass::Prediction));
    };
    let cur = move || st.get().unwrap_or_default();
    // The classes behind the view, for "Copy as curl".
    let api_request = Signal::derive(move || match (model.get(), st.get()) {
        (Some(Ok(m)), Ok(s)) => Some(ApiRequest::get(s.api_url(&m, LISTED))),
        _ => None,
    });

    view! {
        <h1>"Neuron classes"</h1>
        <ShareBar curl=api_request curl_id="curl-classes" />
        <p class="caption" id="classes-about">
            "Following Gurnee et al. 2024, “Universal Neurons in GPT2 Language Models”: each neuron's direction is decoded through "
            "the unembedding (W" <sub>"U"</sub> "·w, one logit per vocabulary token) and the moments of those logits over the whole "
            "vocabulary sort it into a class. " <strong>"Prediction"</strong> " neurons have a heavy right tail (kurtosis > 10, positive skew): "
            "they push a few tokens up. " <strong>"Suppression"</strong> " neurons have a heavy left tail (kurtosis > 10, negative skew): "
            "they push a few tokens down. " <strong>"Partition"</strong> " neurons are spread wide (std ≥ 2 × the median std of the view's "
            "neurons): they split the vocabulary into large groups. The paper reads the down view (what a neuron writes)."
        </p>
        <form class="search" id="classes-form" on:submit=|ev: leptos::ev::SubmitEvent| ev.prevent_default()>
            <ViewSelect id="classes-view" current=Signal::derive(move || cur().view) on_change=set_view />
            <label>
                "Class "
                <select id="classes-class" on:change=set_class>
                    {NeuronClass::ALL
                        .iter()
                        .map(|c| view! { <option value=c.as_str() selected=move || cur().class == *c>{c.as_str()}</option> })
                        .collect_view()}
                </select>
            </label>
        </form>
        {move || {
            if let (None, Some((message, percent))) = (results.get(), building.get()) {
                return crate::map_building(message, percent);
            }
            status_view(results.get(), "Classifying every neuron…", |(m, r)| view! { <ClassesView model=m r=r /> })
        }}
    }
}

/// Per-layer counts of the three classes, stacked.
fn classes_plot(r: &ClassesResponse) -> Plot {
    let layers: Vec<usize> = r.layers.iter().map(|l| l.layer).collect();
    let mut plot = Plot::new();
    for (class, color) in COUNTED {
        let counts: Vec<usize> = r
            .layers
            .iter()
            .map(|l| match class {
                NeuronClass::Prediction => l.prediction,
                NeuronClass::Suppression => l.suppression,
                _ => l.partition,
            })
            .collect();
        let bar = Bar::new(layers.clone(), counts)
            .name(class.as_str())
            .marker(Marker::new().color(color))
            .hover_template(format!("layer %{{x}}<br>%{{y}} {} neurons<extra></extra>", class.as_str()).as_str());
        plot.add_trace(bar);
    }
    plot.set_layout(
        Layout::new()
            .height(340)
            .bar_mode(BarMode::Stack)
            .hover_mode(HoverMode::Closest)
            .margin(Margin::new().left(55).right(10).top(40).bottom(45))
            .legend(Legend::new().orientation(Orientation::Horizontal).x(0.0).y(1.12))
            .x_axis(Axis::new().title("layer").tick_values(layers.iter().map(|&l| l as f64).collect()).show_grid(false))
            .y_axis(Axis::new().title("neurons")),
    );
    plot.set_configuration(Configuration::new().responsive(true).display_logo(false));
    plot
}

fn neuron_href(model: &str, layer: usize, neuron: usize) -> String {
    NeuronState::new(layer, neuron, Some(model.to_owned())).href()
}

#[component]
fn ClassesView(model: String, r: ClassesResponse) -> impl IntoView {
    let navigate = use_navigate();
    // A click on a bar shows that class's strongest neurons.
    let base = ClassesState { model: Some(model.clone()), view: r.view, class: r.class };
    let on_click = Callback::new(move |c: Click| {
        if let Some((class, _)) = COUNTED.get(c.curve) {
            navigate(&ClassesState { class: *class, ..base.clone() }.href(), leptos_router::NavigateOptions { scroll: false, ..Default::default() });
        }
    });
    let plot = classes_plot(&r);
    let total = |f: fn(&shared::LayerClassCounts) -> usize| r.layers.iter().map(f).sum::<usize>();
    let neurons = total(|l| l.neurons);
    let summary = format!(
        "{} view{}: {} prediction, {} suppression and {} partition neurons of {neurons}; median std {:.4}.",
        r.view.as_str(),
        if r.final_norm { " (final norm folded into the unembedding)" } else { "" },
        total(|l| l.prediction),
        total(|l| l.suppression),
        total(|l| l.partition),
        r.median_std,
    );
    let criterion = match r.class {
        NeuronClass::Prediction => format!("kurtosis > {} and positive skew, strongest kurtosis first", r.kurtosis_threshold),
        NeuronClass::Suppression => {
            format!("kurtosis > {} and negative skew, strongest kurtosis first; top tokens of the negated direction", r.kurtosis_threshold)
        }
        NeuronClass::Partition => format!("std ≥ {} × median std ({:.4}), widest first", r.partition_std, r.partition_std * r.median_std),
        NeuronClass::Other => "none of the above".to_owned(),
    };
    let class = r.class.as_str();
    view! {
        <section class="figure" data-layers=r.layers.len()>
            <h2>"Classes by layer"</h2>
            <p class="caption" id="classes-summary">{summary}" Click a bar to list that class."</p>
            <Chart id="classes-chart" plot=plot on_click=on_click />
        </section>
        <section>
            <h2>{format!("Strongest {class} neurons")}</h2>
            <p class="caption">{format!("{} view · {criterion}.", r.view.as_str())}</p>
            {if r.neurons.is_empty() {
                view! { <p class="hint" id="classes-empty">{format!("No {class} neurons in this view.")}</p> }.into_any()
            } else {
                view! {
                    <div class="table-wrap">
                        <table id="classes-table" data-class=class>
                            <thead>
                                <tr><th>"#"</th><th>"neuron"</th><th>"kurtosis"</th><th>"skew"</th><th>"std"</th><th>"top tokens"</th></tr>
                            </thead>
                            <tbody>
                                {r.neurons
                                    .iter()
                                    .enumerate()
                                    .map(|(i, n)| {
                                        let href = neuron_href(&model, n.layer, n.neuron);
                                        view! {
                                            <tr class="classed">
                                                <td>{i + 1}</td>
                                                <td><a class="neuron-link" href=href>{format!("{}:{}", n.layer, n.neuron)}</a></td>
                                                <td>{format!("{:.1}", n.moments.kurtosis)}</td>
                                                <td>{format!("{:+.2}", n.moments.skew)}</td>
                                                <td>{format!("{:.4}", n.moments.std)}</td>
                                                <td class="tokens">{n.top_tokens.iter().take(TOKENS).map(|t| show_token(t)).collect::<Vec<_>>().join("  ")}</td>
                                            </tr>
                                        }
                                    })
                                    .collect_view()}
                            </tbody>
                        </table>
                    </div>
                }
                .into_any()
            }}
        </section>
    }
}
