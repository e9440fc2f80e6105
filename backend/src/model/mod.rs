//! The model: configuration, weight sources and the forward pass with interventions.
pub mod config;
pub mod llama;
pub mod weights;

pub use config::Config;
pub use llama::{Cache, Clamp, ForwardOutput, Intervention, Llama};
pub use weights::{GgufSource, Key, SafetensorsSource, WeightMode, WeightSource};
