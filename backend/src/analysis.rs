//! Questions answered with the neuron map: concept search, neuron detail, model comparison.

/// Things derived from a model once and kept (activation statistics, unit up rows).
#[derive(Default)]
pub struct Derived {}
