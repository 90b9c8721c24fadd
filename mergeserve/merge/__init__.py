"""The pure merge engine: torch, safetensors, pydantic and pyyaml only (no Ray)."""
