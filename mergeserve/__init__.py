"""mergeserve: mergekit-compatible model merging on Ray, and serving with Ray Serve + vLLM."""

__version__ = "0.1.0"
