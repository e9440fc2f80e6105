//! Compare page, `/compare?a=…&b=…`: for two loaded models of the same shape (a base model and
//! its instruct tune, say), the per-layer share of neurons whose top token survived (the paper's
//! §3.3) and the neurons that changed most, each a link.

use leptos::prelude::*;
use leptos_router::hooks::use_navigate;
use plotly::common::Marker;
use plotly::configuration::DisplayModeBar;
use plotly::layout::{Axis, Margin};
use plotly::{Bar, Configuration, Layout, Plot};
use shared::{CompareResponse, ModelSummary};

use crate::chart::Chart;
use crate::share::{ApiRequest, ShareBar};
use crate::state::{self, CompareState, NeuronState};
use crate::{api, show_token, status_view, use_search, Models};

/// Neurons listed as changed most.
const CHANGED: usize = 30;

fn share_plot(r: &CompareResponse) -> Plot {
    let bar = Bar::new(r.layers.iter().map(|l| l.layer).collect::<Vec<_>>(), r.layers.iter().map(|l| 100.0 * l.share).collect::<Vec<_>>())
        .marker(Marker::new().color("#3b6fd8"))
        .hover_template("layer %{x}<br>%{y:.1f}% kept their top token<extra></extra>");
    let mut plot = Plot::new();
    plot.add_trace(bar);
    plot.set_layout(
        Layout::new()
            .height(320)
            .margin(Margin::new().left(55).right(10).top(10).bottom(45))
            .x_axis(Axis::new().title("layer").dtick(1.0))
            .y_axis(Axis::new().title("same top token (%)").range(vec![0.0, 100.0])),
    );
    plot.set_configuration(Configuration::new().responsive(true).display_logo(false).display_mode_bar(DisplayModeBar::False));
    plot
}

#[component]
pub fn Compare() -> impl IntoView {
    let search = use_search();
    let st = Memo::new(move |_| state::parse::<CompareState>(&search.get()));
    let models = Models::get();
    let result = LocalResource::new(move || {
        let s = st.get();
        async move {
            let s = match s {
                Err(e) => return Some(Err(e)),
                Ok(s) => s,
            };
            let url = s.api_url(CHANGED)?;
            // Waits (with the spinner) while the server builds either model's map.
            Some(api::get_waiting::<CompareResponse>(&url, |_| {}).await)
        }
    });
    // The comparison behind the view, for "Copy as curl": once both models are chosen.
    let api_request = Signal::derive(move || st.get().ok()?.api_url(CHANGED).map(ApiRequest::get));
    let navigate = use_navigate();
    let pick = move |which: char, ev: leptos::ev::Event| {
        let id = event_target_value(&ev);
        let mut s = st.get_untracked().unwrap_or_default();
        if which == 'a' {
            s.a = Some(id)
        } else {
            s.b = Some(id)
        }
        navigate(&s.href(), Default::default());
    };
    let pick_b = pick.clone();
    let select = move |id: &'static str, list: Vec<ModelSummary>, cur: Option<String>, f: Box<dyn Fn(leptos::ev::Event)>| {
        view! {
            <select id=id on:change=f>
                <option value="" selected=cur.is_none() disabled=true>"choose a model"</option>
                {list.into_iter().map(|m| {
                    let sel = cur.as_deref() == Some(m.id.as_str());
                    view! { <option value=m.id.clone() selected=sel>{format!("{} ({} × {})", m.name, m.layers, m.neurons_per_layer)}</option> }
                }).collect_view()}
            </select>
        }
    };
    view! {
        <h1>"Compare two models"</h1>
        <ShareBar curl=api_request curl_id="curl-compare" />
        <p class="caption">
            "For two models of the same shape, the share of neurons whose top token (up view) is the same in both, per layer, "
            "and the neurons whose up rows changed most."
        </p>
        {move || status_view(models.0.get(), "Loading models…", |list: Vec<ModelSummary>| {
            if list.len() < 2 {
                return view! {
                    <p class="hint" id="compare-empty">
                        "This server has one model loaded. Start it with a second model of the same shape, e.g. "
                        <code>"flash-interp serve --also path/to/base-model"</code> ", to compare them here."
                    </p>
                }.into_any();
            }
            let s = st.get().unwrap_or_default();
            let pa = pick.clone();
            let pb = pick_b.clone();
            view! {
                <form class="search">
                    <label>"Model A " {select("model-a", list.clone(), s.a.clone(), Box::new(move |ev| pa('a', ev)))}</label>
                    <label>"Model B " {select("model-b", list, s.b.clone(), Box::new(move |ev| pb('b', ev)))}</label>
                </form>
            }.into_any()
        })}
        {move || match result.get().flatten() {
            None if st.get().is_ok() => None,
            r => Some(status_view(r, "Mapping both models and comparing…", |r: CompareResponse| view! { <CompareResult r=r /> })),
        }}
    }
}

#[component]
fn CompareResult(r: CompareResponse) -> impl IntoView {
    let plot = share_plot(&r);
    let model_a = r.model_a.clone();
    let model_b = r.model_b.clone();
    view! {
        <p class="result" id="overall">{format!("{:.1}% of all neurons kept their top token.", 100.0 * r.overall_share)}</p>
        <Chart id="compare-plot" plot=plot />
        <h2>"Neurons that changed most"</h2>
        <div class="table-wrap">
            <table id="changed">
                <thead><tr><th>"neuron"</th><th>"cosine"</th><th>{format!("top in {}", r.model_a)}</th><th>{format!("top in {}", r.model_b)}</th></tr></thead>
                <tbody>
                    {r.changed.iter().map(|c| {
                        let ha = NeuronState::new(c.layer, c.neuron, Some(model_a.clone())).href();
                        let hb = NeuronState::new(c.layer, c.neuron, Some(model_b.clone())).href();
                        view! {
                            <tr>
                                <td><a href=ha>{format!("{}:{}", c.layer, c.neuron)}</a>" "<a href=hb class="secondary-link">"(B)"</a></td>
                                <td>{format!("{:+.3}", c.cosine)}</td>
                                <td class="tokens">{show_token(&c.top_a)}</td>
                                <td class="tokens">{show_token(&c.top_b)}</td>
                            </tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
        </div>
    }
}
