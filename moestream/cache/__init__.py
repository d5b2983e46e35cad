"""Caches on the compute device: the KV cache (and, with offloading, the expert cache)."""
