"""What tokax writes to the terminal: its own status lines, progress bars and emphasis.

Results go to stdout; everything else (status lines, progress bars) to
stderr. A progress setting is ``None`` (auto: shown when stderr is a
terminal), ``True`` (always, e.g. into a log file) or ``False`` (never).
Escape codes are written only to terminals, never into redirected files.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["note", "progress_disabled", "emphasize", "is_terminal"]


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def note(source: str, message: str) -> None:
    """One status line on stderr: ``[source] message``."""
    print(f"[{source}] {message}", file=sys.stderr, flush=True)


def progress_disabled(setting: Any) -> bool | None:
    """tqdm's ``disable`` for a progress setting: None (auto) lets tqdm show the bar only on a
    terminal, True always shows it, False never."""
    if setting is None or setting == "auto":
        return None
    if isinstance(setting, str):
        low = setting.lower()
        if low in ("true", "1", "yes", "on"):
            return False
        if low in ("false", "0", "no", "off"):
            return True
        raise ValueError(f"progress={setting!r}: use None (auto), True or False")
    return not bool(setting)


def emphasize(text: str, stream: TextIO | None = None) -> str:
    """``text`` in bold when ``stream`` (default stdout) is a terminal, unchanged otherwise."""
    return f"\033[1m{text}\033[0m" if is_terminal(stream or sys.stdout) else text
