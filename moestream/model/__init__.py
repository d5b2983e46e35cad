"""The Llama 4 architecture: config dialects, presets, checkpoint reading, the experts seam, the
model, tokenizer and sampling settings."""
