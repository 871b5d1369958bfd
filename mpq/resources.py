"""Locating the data directories (`boards/`, `templates/`, `kernels/`) shipped with mpq.

In a wheel they live inside the package (`mpq/boards`, `mpq/templates`, `mpq/kernels` - the C
kernel library); in a source checkout
or an editable install they sit at the repository root, next to the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the directory `name` (`boards`, `templates` or `kernels`) wherever this install
    keeps it."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"mpq installation is missing its '{name}' directory")
