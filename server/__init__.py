"""One node's LLM server: model, loader, tokenizer, KV cache, batching engine, sampler.

Importing this package does not import torch; the modules that need it do.
"""
