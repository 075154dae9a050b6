"""Cost of one dynamic hard-negative mining check against its anchor, one training step.

Conan states the check costs about one training step. This measures, in one process on the same
data and model (mini scale: tiny_zh 128-wide, 2 layers; zh-mini retrieval groups, batch 32,
group 4): the mean wall time of an InfoNCE training step (forward, backward, AdamW) and of a
DHNM check (re-scoring `rescore` samples with one no-grad forward, then the rule over every
sample), and writes both, the machine and check/step into benchmarks/results/.

    python benchmarks/dhnm_check_cost.py [--examples 3000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch

    from embedkit.data.contrastive import ContrastiveDataModule
    from embedkit.data.sources import zh_mini_jsonl
    from embedkit.mining.dynamic import DynamicHardNegatives
    from embedkit.models.build import char_level_tokenizer, tiny_zh_encoder
    from embedkit.objectives.infonce import info_nce_loss

    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rescore", type=int, default=32)
    args = ap.parse_args()

    data_dir = os.environ.get("EMBEDKIT_DATA_DIR", str(ROOT.parent / "shared" / "data" / "zh-mini"))
    rows = [r for f in ("nli_triplets", "stsb_hardneg", "cmrc_pairs")
            for r in zh_mini_jsonl(data_dir, f"train/{f}.jsonl")][:args.examples]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = char_level_tokenizer([t for r in rows for t in (r["query"], *r["pos"], *r["neg"])],
                                   out_dir=tmp, corpora=())
    dm = ContrastiveDataModule([lambda: rows], batch_size=32, train_group_size=4, seed=0)
    dm.attach_tokenizer(tok)
    dm.setup()
    encoder = tiny_zh_encoder(tok, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                              pooling="mean")
    encoder.train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    batches = iter(dm.train_dataloader())

    def step():
        b = next(batches)
        loss = info_nce_loss(encoder(**b["query"]), encoder(**b["passages"]), 0.02)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cb = DynamicHardNegatives(rescore=args.rescore)
    cb.attach(dm.dataset, encoder=encoder, pad_id=tok.pad_token_id)
    rng = np.random.default_rng(0)
    cb.initial[:] = rng.uniform(0.3, 0.6, len(rows))          # every sample scored once already
    cb.seen_at[:] = 0

    def check(i):
        cb.check(step=i + 1)

    timings = {}
    for name, fn in (("train_step", lambda i: step()), ("dhnm_check", check)):
        fn(0)                                                 # warm-up
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            fn(i + 1)
            times.append(time.perf_counter() - start)
        timings[name] = {"mean_s": statistics.mean(times), "median_s": statistics.median(times)}
    result = {
        "benchmark": "dhnm_check_cost", "anchor": "train_step",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        "settings": vars(args), **timings,
        "ratio_check_over_step": timings["dhnm_check"]["median_s"] / timings["train_step"]["median_s"],
    }
    out = ROOT / "benchmarks" / "results" / "dhnm_check_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
