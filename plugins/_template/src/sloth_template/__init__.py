"""sloth-template: the smallest complete sloth plugin."""

__version__ = "0.1.0"
