"""Which code produced a run: the git commit of the checkout (W&B tags, reports, model cards) and
the command that started it (model cards).

Outside a git checkout (an installed wheel, a copied folder, no `git` binary) the answer is
"unknown" rather than an error: provenance must never stop a run.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
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


def command_line(root: str | Path | None = None) -> str:
    """The command that started this process, credentials masked (embedkit/redact.py).

    In a Hydra job it is the job's own overrides after the script, `python run.py a=1 b=2`: one job
    of a `-m` sweep gets its own values, not the sweep's lists, so the line re-runs that job.
    Otherwise the process's arguments. The script is named relative to `root` (the checkout) when
    it lies inside it."""
    from embedkit.redact import redact_text

    script, args = (sys.argv or [""])[0], list(sys.argv[1:])
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            args = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        pass
    if root is not None:
        try:
            script = str(Path(script).resolve().relative_to(Path(root).resolve()))
        except (ValueError, OSError):
            pass
    # Masked per argument, then quoted: the masked line still pastes into a shell.
    return shlex.join(["python", redact_text(script), *(redact_text(str(a)) for a in args)])
