"""The data-preparation pipeline behind `python -m embedkit.mining` (config: conf/mine.yaml).

read rows -> filters in order (MinHash de-duplication, teacher-score filtering; each reports what
it kept and dropped) -> ANN hard-negative mining (mined / dropped / filled) -> one FlagEmbedding
jsonl `{query, pos, neg[, candidates]}` plus `report.json` beside it. Training reads the file
through a data config (conf/data/mined_file.yaml: `data=mined_file data.file=<path>`).

The encoder that embeds for mining (and for the teacher filter when it names no model of its own)
is `model.init_from` when set (a saved embedkit / HF folder, e.g. a finished general stage: the
"current model" of C-Pack's stage-2 mining), else a fresh `model=tiny_zh` built over the rows'
characters, whose mean-pooled random embeddings rank by shared characters.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from embedkit.data.weak_pairs import write_jsonl

log = logging.getLogger(__name__)


def build_encoder(cfg: DictConfig, texts: list[str], out_dir: Path):
    import torch
    from hydra.utils import instantiate

    from embedkit.models.build import load_encoder

    torch.manual_seed(cfg.seed)
    if cfg.model.get("init_from"):
        return load_encoder(cfg.model.init_from,
                            trust_remote_code=bool(cfg.model.get("trust_remote_code", False)))
    tokenizer = instantiate(cfg.model.tokenizer, texts=texts, out_dir=str(out_dir / "tokenizer"))
    return instantiate(cfg.model.encoder, tokenizer=tokenizer)


def read_pool(path: str | None) -> list[str] | None:
    """FlagEmbedding's `--candidate_pool`: a jsonl of {"text": ...}; None = the rows' own texts."""
    if not path:
        return None
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                texts.append(obj["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: candidate pool rows must be {{\"text\": str}} "
                                 f"({type(e).__name__}: {e})") from None
    return texts


def run(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from embedkit.redact import write_json

    start = time.perf_counter()
    out_path = Path(cfg.output)
    rows = [r for source in cfg.input for r in instantiate(source)()]
    if not rows:
        raise ValueError("the configured input sources produced no rows")
    texts = [t for r in rows for t in (r["query"], *r["pos"], *r.get("neg", ()))]
    encoder = build_encoder(cfg, texts, out_path.parent)
    report: dict = {"rows_in": len(rows), "filters": []}
    for name, spec in (cfg.get("filters") or {}).items():
        if spec is None:
            continue
        rows, freport = instantiate(spec)(rows, encoder=encoder)
        report["filters"].append(freport.as_dict())
        print(f"filter {name}: kept {freport.kept}, dropped {freport.dropped}")
    if cfg.get("miner") is not None:
        rows, mreport = instantiate(cfg.miner)(rows, encoder, pool=read_pool(cfg.get("pool")))
        report["mining"] = mreport.as_dict()
        print(f"mining: {mreport}")
    report["rows_out"] = len(rows)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_jsonl(rows, out_path)
    write_json(out_path.parent / "report.json", report)   # redacted, as results.json
    print(f"wrote {len(rows)} rows to {out_path} ({report['seconds']} s)")
    return report
