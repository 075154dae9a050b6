"""Which code produced a run: the git commit of the checkout, for W&B tags and reports.

Outside a git checkout (an installed wheel, a copied folder, no `git` binary) the answer is
"unknown" rather than an error: provenance must never stop a run.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def git_commit(root: str | Path) -> str:
    """Short commit hash of the checkout at `root`, `-dirty` when tracked files changed; "unknown"
    outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short=10", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
