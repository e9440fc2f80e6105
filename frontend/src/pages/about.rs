//! About: the method in a few sentences, with the formula.

use leptos::prelude::*;

#[component]
pub fn About() -> impl IntoView {
    view! {
        <h1>"How it works"</h1>
        <p>
            "Flash Interp follows “Flash Interpretability” (Davies). Every MLP neuron of a Llama-style model has an "
            "up-projection row: a vector in the residual stream. Multiply it by the unembedding W"<sub>"U"</sub>
            " and take the softmax, and you get a distribution over tokens that says what the neuron looks for. "
            "Doing that for every neuron of every layer is one big matrix product, done once per model and cached: the neuron map."
        </p>
        <p>
            "Concept search scores every neuron by its normalised probability"
        </p>
        <p class="formula">
            <code>"score(t) = p(t) / mean(top-100 p) = exp(logit"<sub>"t"</sub>" − logsumexp(top-100 logits) + ln 100)"</code>
        </p>
        <p>
            "The softmax denominator cancels, so with each neuron's top-100 statistic stored a search is one matrix–vector "
            "product over all neurons. Spikes in the per-layer plot are feature neurons. Because negating a neuron's up row "
            "and its down column together leaves the model unchanged, each direction is also decoded negated (“neg”)."
        </p>
        <p>
            "Some models' raw logits are too flat for this score to tell tokens apart: Gemma 3 270M's neurons spread their "
            "logits by 0.035 nat over the vocabulary (SmolLM2's by 0.47), so every score is about 1. For such models (a "
            "median spread under 0.1 nat) the scores are σ-scaled by default: each neuron's logits are divided by their own "
            "standard deviation before the softmax. That keeps every neuron's order of tokens and the map; it changes how "
            "sharply the score separates them, and so how neurons compare. The search page's “Scores” picks either."
        </p>
        <p>
            "Clamping forces a neuron's activation act(gate(x)) · up(x) — the input of down_proj — to a constant at every "
            "position. Sweeping the clamp value against p(target) shows the neuron's role; the steer page shows it in a "
            "conversation, normal and steered side by side."
        </p>
        <p>
            "Everything is also available without the browser: the "<code>"flash-interp"</code>" command line and the JSON API ("
            <a href="/api/openapi.json">"OpenAPI"</a>")."
        </p>
    }
}
