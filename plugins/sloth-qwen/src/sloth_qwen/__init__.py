"""sloth-qwen: Qwen2 and Qwen3 for sloth; the hooks are in :mod:`sloth_qwen.plugin`."""
