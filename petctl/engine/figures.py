"""Writing matplotlib figures: by temp file and rename, so a reader never sees half a PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Save `fig` as a PNG at `path` atomically (temp file in the same folder, then rename), and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
