"""Preset of ``configs/tree.py`` for method spectr (see there)."""

from configs.tree import get_config as _tree_config


def get_config(arg=None):
    return _tree_config(arg or "spectr")
