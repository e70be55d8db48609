"""minissb: Semantic Soft Bootstrapping (SSB) for Qwen2.5 in small, readable, pure PyTorch."""

__version__ = "0.1.0"
