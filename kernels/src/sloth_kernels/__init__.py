"""sloth-kernels: Triton implementations of the sloth core's named ops."""

__version__ = "0.1.0"
