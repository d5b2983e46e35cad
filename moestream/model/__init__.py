"""The Llama 4 architecture: config dialects, checkpoint reading, the model, tokenizer, sampling."""
