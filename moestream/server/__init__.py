"""The OpenAI-compatible HTTP server over the batcher (scheduler/batch.py): app.py (endpoints, request
validation, SSE streaming, text), metrics.py (Prometheus text from the snapshots)."""
