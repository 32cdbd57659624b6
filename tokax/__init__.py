"""tokax: token-level language-model methods in JAX."""

__version__ = "0.1.0"

from pathlib import Path as _Path

# Trained weights and data shipped with the package (see each folder's summary.json).
ASSETS_DIR = _Path(__file__).resolve().parent / "assets"
