"""Keep secrets out of what a run writes: the saved Hydra configs, results.json, logged hyper-parameters.

Why: run folders get copied, shared and committed (tables, notebooks), and W&B uploads the
hyper-parameters it is given. A key passed as an override (`+logger.api_key=...`) or pasted into a
config value would travel with them. Two rules, applied to every config or result embedkit writes:

- a config key named like a credential (`*api_key*`, `*apikey*`, `*secret*`, `*password*`,
  `*passwd*`, or with `token` as a word of its name: `token`, `hf_token`, `access_token`,
  `auth_token`) gets the value "***". Tokenizer settings are not credentials: `tokenizer`,
  `max_tokens`, and the special tokens (`pad_token`, `cls_token`, ... and their `*_id`) are kept.
  Override strings `key=value` (Hydra's overrides.yaml, `override_dirname`, run labels) follow the
  same rule for their key.
- the value of every credential-named environment variable (WANDB_API_KEY, HF_TOKEN, ...) is
  replaced by "***" wherever it appears inside a string.

`RedactSecrets` is a Hydra callback (conf/hydra/default.yaml): Hydra writes `.hydra/config.yaml`,
`hydra.yaml` and `overrides.yaml` (and a sweep's `multirun.yaml`) before the job starts, and the
callback rewrites them redacted before any training code runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from hydra.types import RunMode

log = logging.getLogger(__name__)

MASK = "***"
# Shorter environment values are not treated as secrets: replacing "1" or "true" in every string
# would mangle the results while protecting nothing.
MIN_SECRET_LENGTH = 8

_SECRET_SUBSTRINGS = ("api_key", "apikey", "api-key", "secret", "password", "passwd")
_TOKENIZER_WORDS = {"pad", "cls", "sep", "unk", "mask", "bos", "eos", "max", "num", "min"}


def is_secret_key(key: Any) -> bool:
    """True for a config key (or dotted path) whose last part names a credential."""
    name = str(key).rsplit(".", 1)[-1].lstrip("+~").lower()
    if any(s in name for s in _SECRET_SUBSTRINGS):
        return True
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    if "token" not in words and "tokens" not in words:
        return False
    # pad_token, cls_token_id, max_tokens, ...: tokenizer and length settings, not credentials
    return not (words[0] in _TOKENIZER_WORDS or words[-1] in {"id", "ids"} or words == ["tokens"])


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-named environment variables (WANDB_API_KEY, HF_TOKEN, ...), longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_key(k) and len(v or "") >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


_OVERRIDE = re.compile(r"(?P<key>[+~]{0,2}[A-Za-z_][\w.@/-]*)=(?P<value>'[^']*'|\"[^\"]*\"|[^,\s]*)")


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """A string with secret environment values masked, and the value of any `key=value` override
    whose key names a credential masked too (as in "a=1,logger.api_key=xyz")."""
    secrets = secret_env_values() if secrets is None else secrets
    for value in secrets:
        text = text.replace(value, MASK)
    return _OVERRIDE.sub(lambda m: f"{m['key']}={MASK}" if is_secret_key(m["key"]) and m["value"]
                         else m.group(0), text)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON/YAML-like structure with credential-named keys' values and secret strings masked.

    A credential-named key holding a mapping or list is descended into (its scalars are masked);
    None and "" are left as they are, there is nothing to hide.
    """
    secrets = secret_env_values() if secrets is None else secrets
    return _redact(obj, secrets, masked=False)


def _redact(obj: Any, secrets: list[str], masked: bool) -> Any:
    if isinstance(obj, Mapping):
        return {k: _redact(v, secrets, masked or is_secret_key(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, secrets, masked) for v in obj)
    if masked and obj is not None and obj != "":
        return MASK
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` redacted, as results.json files are written (indented, UTF-8, CJK unescaped).

    Atomically (embedkit/atomic_files.py): a kill mid-write leaves the previous file, not half a one.
    """
    from embedkit.atomic_files import write_text_atomic

    return write_text_atomic(path, json.dumps(redact(data), indent=2, ensure_ascii=False))


def redact_yaml_file(path: str | Path) -> bool:
    """Rewrite a YAML file (a saved Hydra config) with secrets masked; True if it changed.

    Interpolations such as `${oc.env:X}` are plain strings to YAML and stay unresolved.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    clean = redact(data)
    if clean == data:
        return False
    path.write_text(yaml.safe_dump(clean, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return True


HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


class RedactSecrets(Callback):
    """Rewrites the job's saved Hydra configs (and the sweep's multirun.yaml) with secrets masked."""

    def on_job_start(self, config, **kwargs) -> None:
        hydra = config.hydra
        changed = []
        if hydra.get("output_subdir") is not None:
            folder = Path(hydra.runtime.output_dir) / hydra.output_subdir
            changed += [folder / n for n in HYDRA_FILES if redact_yaml_file(folder / n)]
        if hydra.mode == RunMode.MULTIRUN:
            sweep_file = Path(hydra.sweep.dir) / "multirun.yaml"
            if redact_yaml_file(sweep_file):
                changed.append(sweep_file)
        if changed:
            log.info("masked secrets in %s", ", ".join(str(p) for p in changed))
