"""The KV cache: one-chunk rings for the RoPE layers, device / host / disk tiers for the global ones."""
