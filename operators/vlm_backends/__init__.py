"""Caption backends for vlm_caption: OpenAI-compatible HTTP, transformers, vLLM."""
