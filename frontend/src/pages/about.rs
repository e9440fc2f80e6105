//! About: the method in a few sentences.

use leptos::prelude::*;

#[component]
pub fn About() -> impl IntoView {
    view! {
        <h1>"How it works"</h1>
        <p>
            "Every MLP neuron of a Llama-style model has an up-projection row: a vector in the residual stream. "
            "Multiply it by the unembedding W_U and take the softmax, and you get the tokens the neuron looks for."
        </p>
        <p>
            "Concept search scores every neuron by its normalised probability p(t) / mean(top-100 p) = "
            <code>"exp(logit_t − logsumexp(top-100 logits) + ln 100)"</code>
            ": one matrix–vector product over all neurons once each neuron's top-100 statistic is stored."
        </p>
        <p>
            "Clamping a neuron forces its activation act(gate(x)) · up(x) to a constant at every position; "
            "sweeping the value against p(target) shows the neuron's role."
        </p>
    }
}
