"""Evaluation of merged models: perplexity per token and per byte (transformers or vLLM), lm-eval tasks."""
