//! Models: what the server has loaded, with links into each page for that model.

use leptos::prelude::*;
use shared::ModelSummary;

use crate::state::{ModelPage, SearchState, SteerState};
use crate::{status_view, Models};

#[component]
pub fn Home() -> impl IntoView {
    let models = Models::get();
    view! {
        <h1>"Models"</h1>
        {move || status_view(models.0.get(), "Loading models…", |list: Vec<ModelSummary>| view! {
            <ul id="models">
                {list.into_iter().map(|m| {
                    let search = SearchState { model: Some(m.id.clone()), q: " dog".into(), ..Default::default() }.href();
                    let steer = SteerState { model: Some(m.id.clone()), ..Default::default() }.href();
                    let maps = if m.maps_ready.is_empty() { "neuron map: building".to_owned() } else {
                        format!("neuron maps ready: {}", m.maps_ready.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "))
                    };
                    let scores = match m.search_scale {
                        Some(shared::Scale::Std) => " · search scores σ-scaled (flat raw logits)",
                        Some(shared::Scale::Raw) => " · search scores: the paper's",
                        None => "",
                    };
                    view! {
                        <li class="model" data-id=m.id.clone()>
                            <strong>{m.name.clone()}</strong>
                            <span class="id">{format!(" ({})", m.id)}</span>
                            <br />
                            {format!(
                                "{} · {} · {} layers × {} neurons · d_model {} · vocabulary {} · context {}{} · {maps}{scores}",
                                m.architecture, m.format, m.layers, m.neurons_per_layer, m.d_model, m.vocab_size, m.context,
                                if m.chat { " · chat template" } else { "" },
                            )}
                            <br />
                            <a href=search>"search"</a>" · "<a href=steer>"steer"</a>
                        </li>
                    }
                }).collect_view()}
            </ul>
        })}
    }
}
