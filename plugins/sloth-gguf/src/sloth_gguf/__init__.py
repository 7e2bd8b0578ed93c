"""sloth-gguf: GGUF export for llama.cpp; the hooks are in :mod:`sloth_gguf.plugin`."""
