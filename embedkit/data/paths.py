"""Where the zh-mini bundle lives, and the error a user sees when it is not there.

The bundle is read in place (it must never be copied into the project). The path comes from
`paths.data_dir`, which defaults to `$EMBEDKIT_DATA_DIR` or else `../shared/data/zh-mini` beside the
repository.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "zh-mini"


def require_data_dir(data_dir: str | Path, needs: str = "train") -> Path:
    """Return `data_dir` if it holds the zh-mini layout, else explain where we looked and how to fix it."""
    path = Path(data_dir).expanduser()
    if not (path / needs).is_dir():
        raise FileNotFoundError(
            f"zh-mini data not found: looked for '{needs}/' in {path.resolve()} (paths.data_dir). "
            f"Point embedkit at the bundle with `export EMBEDKIT_DATA_DIR=/path/to/zh-mini` or the "
            f"override `paths.data_dir=/path/to/zh-mini`.")
    return path


def data_file(data_dir: str | Path, relative: str) -> Path:
    """A file inside the bundle, with the same clear error when the bundle is missing."""
    first = relative.split("/", 1)[0]
    path = require_data_dir(data_dir, needs=first) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file in the zh-mini bundle at {Path(data_dir).resolve()}")
    return path
