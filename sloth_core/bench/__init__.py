"""Benchmarks: ``sloth bench kernels`` (ops) against torch eager and ``torch.compile``."""
