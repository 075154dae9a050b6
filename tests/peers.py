"""Peer implementations the tests compare embedkit against: FlagEmbedding 1.4.2's training losses.

`flagembedding_modeling()` returns FlagEmbedding's three training modules, imported from the
installed package (the `dev` extra pins FlagEmbedding==1.4.2):

    AbsModeling  FlagEmbedding/abc/finetune/embedder/AbsModeling.py  (in-batch, cross-device,
                 `distill_loss`: kl_div and m3_kd_loss)
    base         FlagEmbedding/finetune/embedder/encoder_only/base/modeling.py  (BiEncoderOnlyEmbedderModel)
    m3           FlagEmbedding/finetune/embedder/encoder_only/m3/modeling.py    (EncoderOnlyEmbedderM3Model)

How: `import FlagEmbedding` runs its package `__init__`, which imports the inference code, and that
fails on transformers 5 (`transformers.modeling_attn_mask_utils` is gone); the `__init__` of each
package on the way down imports runners and trainers that need more of the same. The three modules
themselves only need torch and `transformers.PreTrainedTokenizer` / `ModelOutput`. So each package
on the path (FlagEmbedding, FlagEmbedding.abc, ...) is put into `sys.modules` as an empty module
object whose `__path__` is the installed folder, which lets the import system find the submodules
without running any `__init__`; then the three modules are imported by name. The one name
`base/modeling.py` and `m3/modeling.py` take from their parent package
(`from FlagEmbedding.abc.finetune.embedder import AbsEmbedderModel, EmbedderOutput`) is set on the
stub from AbsModeling. Nothing of FlagEmbedding is copied or patched; the stubs are removed from
`sys.modules` again (the imported modules keep working: they hold their own globals).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

FLAGEMBEDDING_VERSION = "1.4.2"
_PACKAGES = ("FlagEmbedding", "FlagEmbedding.abc", "FlagEmbedding.abc.finetune",
             "FlagEmbedding.abc.finetune.embedder", "FlagEmbedding.finetune",
             "FlagEmbedding.finetune.embedder", "FlagEmbedding.finetune.embedder.encoder_only",
             "FlagEmbedding.finetune.embedder.encoder_only.base",
             "FlagEmbedding.finetune.embedder.encoder_only.m3")
_MODULES = {"AbsModeling": "FlagEmbedding.abc.finetune.embedder.AbsModeling",
            "base": "FlagEmbedding.finetune.embedder.encoder_only.base.modeling",
            "m3": "FlagEmbedding.finetune.embedder.encoder_only.m3.modeling"}
_loaded: dict[str, types.ModuleType] | None = None


def flagembedding_modeling() -> dict[str, types.ModuleType]:
    """{"AbsModeling", "base", "m3"}: FlagEmbedding 1.4.2's training modules (see the module
    docstring). pytest.skip when FlagEmbedding is not installed; an error for another version."""
    global _loaded
    if _loaded is not None:
        return _loaded
    import pytest
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("FlagEmbedding")
    except PackageNotFoundError:
        pytest.skip("FlagEmbedding is not installed (pip install -e '.[dev]' pins FlagEmbedding==1.4.2)")
    if found != FLAGEMBEDDING_VERSION:
        raise RuntimeError(f"the peer tests compare against FlagEmbedding=={FLAGEMBEDDING_VERSION}, "
                           f"found {found} (pyproject.toml's dev extra pins it)")
    spec = importlib.util.find_spec("FlagEmbedding")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name == "FlagEmbedding" or name.startswith("FlagEmbedding.")}
    try:
        for name in _PACKAGES:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = stub
        modules = {"AbsModeling": importlib.import_module(_MODULES["AbsModeling"])}
        parent = sys.modules["FlagEmbedding.abc.finetune.embedder"]
        parent.AbsEmbedderModel = modules["AbsModeling"].AbsEmbedderModel
        parent.EmbedderOutput = modules["AbsModeling"].EmbedderOutput
        for key in ("base", "m3"):
            modules[key] = importlib.import_module(_MODULES[key])
    finally:
        for name in [n for n in sys.modules if n == "FlagEmbedding" or n.startswith("FlagEmbedding.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    _loaded = modules
    return modules
