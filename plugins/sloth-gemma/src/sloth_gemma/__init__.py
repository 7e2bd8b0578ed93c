"""sloth-gemma: Gemma, Gemma 2 and Gemma 3 (text); the hooks are in :mod:`sloth_gemma.plugin`."""
