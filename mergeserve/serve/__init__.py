"""Serving merged checkpoints with Ray Serve + vLLM."""
