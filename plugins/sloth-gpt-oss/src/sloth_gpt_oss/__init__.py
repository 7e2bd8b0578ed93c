"""sloth-gpt-oss: gpt-oss models (model_type ``gpt_oss``) through sloth's op registry."""

__version__ = "0.1.0"
