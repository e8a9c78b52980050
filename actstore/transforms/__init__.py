"""Pure compute on tensors: models and hooks, SAEs, training steps, metrics and analyses."""
