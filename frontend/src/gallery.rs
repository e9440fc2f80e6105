//! The gallery on the home page (concept search with nothing typed yet): curated examples that
//! work on the served model, each with the effect the server measured with its own sweep and
//! samples (`flash-interp gallery` reruns them and fails when one stops working). Each card
//! links to its concept search, its neuron, and the steer page that reruns the very samples its
//! figures count.

use leptos::prelude::*;
use shared::{GalleryExample, GalleryResponse};

use crate::state::{self, ModelPage, NeuronState, SearchState, SteerState};
use crate::{api, percent, show_token};

/// The gallery of `model`, fetched once.
fn fetch_gallery(model: &str) -> LocalResource<Result<GalleryResponse, String>> {
    let url = format!("/api/models/{}/gallery", state::segment(model));
    LocalResource::new(move || {
        let url = url.clone();
        async move { api::get::<GalleryResponse>(&url).await }
    })
}

#[component]
pub fn Gallery(model: String) -> impl IntoView {
    let r = fetch_gallery(&model);
    move || {
        let examples = r.get()?.ok()?.examples;
        (!examples.is_empty()).then(|| {
            let model = model.clone();
            view! {
                <section id="gallery">
                    <h2>"Try these"</h2>
                    <p class="caption">
                        "Neurons that concept search finds, checked by clamping them. Every figure is measured on this model "
                        "by the product's own sweep and samples; “Steer it” reruns the same samples."
                    </p>
                    <div class="cards">{examples.into_iter().map(|ex| card(&model, ex)).collect_view()}</div>
                </section>
            }
        })
    }
}

/// "Or try …": the model's first gallery example as a steer link (its clamp, prompt and samples),
/// for a steer page with no clamp yet; nothing for a model without a gallery.
#[component]
pub fn TryExample(model: String) -> impl IntoView {
    let r = fetch_gallery(&model);
    move || {
        let ex = r.get()?.ok()?.examples.into_iter().next()?;
        let steer = SteerState::from_gallery(&ex, Some(model.clone())).href();
        let figure = ex.measured.as_ref().map(|m| format!(": p({}) {} → {}", show_token(&ex.target), percent(m.p_normal), percent(m.p_clamped)));
        Some(view! {
            " Or try "
            <a id="steer-try" href=steer>{format!("{}:{} = {}", ex.layer, ex.neuron, ex.clamp)}</a>
            {format!(" ({}{})", ex.title.to_lowercase(), figure.unwrap_or_default())}
            "."
        })
    }
}

fn card(model: &str, ex: GalleryExample) -> impl IntoView {
    let search = SearchState { model: Some(model.to_owned()), q: ex.concept.clone(), view: ex.view, ..Default::default() }.href();
    let neuron = NeuronState::new(ex.layer, ex.neuron, Some(model.to_owned())).href();
    let steer = SteerState::from_gallery(&ex, Some(model.to_owned())).href();
    let figures = ex.measured.as_ref().map(|m| {
        let sweep = format!("p({}) {} → {} at clamp {}", show_token(&ex.target), percent(m.p_normal), percent(m.p_clamped), ex.clamp);
        let count = format!("“{}” in {} of {n} steered answers, {} of {n} normal", ex.word, m.steered_mentions, m.normal_mentions, n = ex.samples);
        let sample = m.steered_answer.trim().to_owned();
        view! {
            <p class="figures"><span class="sweep">{sweep}</span><br /><span class="count">{count}</span></p>
            <blockquote class="sample"><span class="who">"steered: "</span>{sample}</blockquote>
        }
    });
    let how = format!(
        "{}:{} = {} · “{}”{} · temperature {}",
        ex.layer,
        ex.neuron,
        ex.clamp,
        ex.prompt,
        if ex.chat { " (chat)" } else { "" },
        ex.temperature
    );
    view! {
        <article class="gallery-card">
            <h3>{ex.title.clone()}</h3>
            <p class="note">{ex.note.clone()}</p>
            {figures}
            <p class="how">{how}</p>
            <p class="links">
                <a href=search>{format!("search {}", show_token(&ex.concept))}</a>" · "
                <a href=neuron>{format!("neuron {}:{}", ex.layer, ex.neuron)}</a>" "
                <a class="button" href=steer>"Steer it"</a>
            </p>
        </article>
    }
}
