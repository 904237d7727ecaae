"""Where petctl keeps its runs: `--home`, else `$PETCTL_HOME`, else `./cache`."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("cache")


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """Return the home folder (not created)."""
    if home is not None:
        return Path(home)
    env = os.environ.get("PETCTL_HOME")
    return Path(env) if env else DEFAULT_HOME
