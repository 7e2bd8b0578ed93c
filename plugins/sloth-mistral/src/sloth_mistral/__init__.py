"""sloth-mistral: Mistral models (model_type ``mistral``) through sloth's op registry."""

__version__ = "0.1.0"
