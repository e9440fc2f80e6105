//! Home: the loaded models (the model picker of the full app starts here).

use leptos::prelude::*;
use shared::ModelSummary;

use crate::api;

#[component]
pub fn Home() -> impl IntoView {
    let models = LocalResource::new(|| api::get::<Vec<ModelSummary>>("/api/models"));
    view! {
        <h1>"Models"</h1>
        <Suspense fallback=|| view! { <p class="loading">"Loading models…"</p> }>
            {move || {
                models
                    .get()
                    .map(|r| match r {
                        Ok(list) => {
                            view! {
                                <ul id="models">
                                    {list
                                        .into_iter()
                                        .map(|m| {
                                            view! {
                                                <li class="model" data-id=m.id.clone()>
                                                    <strong>{m.name.clone()}</strong>
                                                    {format!(
                                                        " — {} layers × {} neurons, vocabulary {}",
                                                        m.layers,
                                                        m.neurons_per_layer,
                                                        m.vocab_size,
                                                    )}
                                                </li>
                                            }
                                        })
                                        .collect_view()}
                                </ul>
                            }
                                .into_any()
                        }
                        Err(e) => view! { <p class="error">{e}</p> }.into_any(),
                    })
            }}
        </Suspense>
    }
}
