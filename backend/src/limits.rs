//! Input validation shared by the CLI and the HTTP API. The bounds themselves live in `shared`
//! so clients can show them.

use shared::limits::*;

use crate::error::{Error, Result};
use crate::model::Config;

pub fn check_layer_neuron(layer: usize, neuron: usize, cfg: &Config) -> Result<()> {
    if layer >= cfg.n_layers {
        return Err(Error::bad(format!("layer {layer} is out of range: the model has layers 0..{}", cfg.n_layers - 1)));
    }
    if neuron >= cfg.d_ff {
        return Err(Error::bad(format!("neuron {neuron} is out of range: layers have neurons 0..{}", cfg.d_ff - 1)));
    }
    Ok(())
}

pub fn check_clamp_value(value: f32) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::bad(format!("clamp value {value} is not a finite number")));
    }
    if value.abs() > MAX_CLAMP_ABS {
        return Err(Error::bad(format!("clamp value {value} is outside the allowed range ±{MAX_CLAMP_ABS}")));
    }
    Ok(())
}

pub fn check_clamp(layer: usize, neuron: usize, value: f32, cfg: &Config) -> Result<()> {
    check_layer_neuron(layer, neuron, cfg)?;
    check_clamp_value(value)
}

pub fn check_sampling(temperature: f64, top_p: Option<f64>, max_new_tokens: usize) -> Result<()> {
    if !temperature.is_finite() || !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
        return Err(Error::bad(format!("temperature {temperature} must be between 0 and {MAX_TEMPERATURE}")));
    }
    if let Some(p) = top_p {
        if !p.is_finite() || p <= 0.0 || p > 1.0 {
            return Err(Error::bad(format!("top_p {p} must be in (0, 1]")));
        }
    }
    if max_new_tokens == 0 || max_new_tokens > MAX_NEW_TOKENS {
        return Err(Error::bad(format!("max_new_tokens {max_new_tokens} must be between 1 and {MAX_NEW_TOKENS}")));
    }
    Ok(())
}

pub fn check_prompt_text(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::bad("the prompt is empty"));
    }
    if text.len() > MAX_PROMPT_BYTES {
        return Err(Error::TooLarge(format!("the prompt has {} bytes; the limit is {MAX_PROMPT_BYTES}", text.len())));
    }
    Ok(())
}

pub fn check_prompt_tokens(n: usize, max_new: usize, context: usize) -> Result<()> {
    let limit = MAX_PROMPT_TOKENS.min(context);
    if n > limit {
        return Err(Error::TooLarge(format!("the prompt has {n} tokens; the limit is {limit}")));
    }
    if n + max_new > context {
        return Err(Error::TooLarge(format!("prompt ({n} tokens) plus max_new_tokens ({max_new}) exceed the model's context of {context} tokens")));
    }
    Ok(())
}

pub fn check_sweep_values(values: &[f32]) -> Result<()> {
    if values.is_empty() || values.len() > MAX_SWEEP_VALUES {
        return Err(Error::bad(format!("a sweep takes 1 to {MAX_SWEEP_VALUES} values, got {}", values.len())));
    }
    values.iter().try_for_each(|&v| check_clamp_value(v))
}

pub fn check_top_k(top_k: usize) -> Result<()> {
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(Error::bad(format!("top_k {top_k} must be between 1 and {MAX_TOP_K}")));
    }
    Ok(())
}

/// A request's estimated work against a server's per-request budget (both in FLOPs).
pub fn check_work(flops: f64, budget: f64) -> Result<()> {
    if flops > budget {
        return Err(Error::OverBudget(format!(
            "this request needs about {:.2} TFLOP of computation (memory traffic included); this server allows {:.2} \
             per request (serve --max-request-tflop): use a shorter prompt, fewer sweep values or fewer new tokens",
            flops / 1e12,
            budget / 1e12
        )));
    }
    Ok(())
}
