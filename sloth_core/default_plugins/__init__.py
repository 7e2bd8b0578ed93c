"""The core's built-in plugins: fallbacks that any installed plugin overrides."""
