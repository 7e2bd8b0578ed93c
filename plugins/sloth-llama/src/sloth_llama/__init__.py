"""sloth-llama: Llama-family models (model_type ``llama``) through sloth's op registry."""

__version__ = "0.1.0"
