"""Static estimate: per-op gains from weights and activations, no backward pass."""
