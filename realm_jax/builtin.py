"""Built-in model names (placeholder until the GGUF loader lands)."""
BUILTIN_MODELS = {}
