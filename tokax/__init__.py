"""tokax: token-level language-model methods in JAX."""

__version__ = "0.1.0"
