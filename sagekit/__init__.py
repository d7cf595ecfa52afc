"""sagekit: SAGE-PTQ ultra-low-bit compression and inference for Llama models, without PyTorch."""

__version__ = "0.1.0"
