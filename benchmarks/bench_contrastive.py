"""Contrastive training and encoding throughput: embedkit against sentence-transformers, interleaved.

    python benchmarks/bench_contrastive.py                       # the full bench (make bench): RESULTS.md
    python benchmarks/bench_contrastive.py --repeats 2 --seconds 3   # the same plan, short repeats
    python benchmarks/bench_contrastive.py --quick               # tiny sizes: every configuration runs
    python benchmarks/bench_contrastive.py --sections main,fastpaths,encode,gradcache,memory

Both sides train the same tiny_zh-sized BERT (hidden 128, 2 layers, 2 heads, FFN 512, dropout
0.1, mean pooling; exported once, loaded by both) on the same pairs at the same batch size, max
length 128 as the cap, each side padding every batch to its own longest text, with the same loss
and optimiser settings (benchmarks/bench_sides.py). The pairs are real and of mixed length: query
and first positive of every row of zh-mini's retrieval-format training files (cmrc_pairs,
nli_triplets, afqmc_pairs, stsb_hardneg), de-duplicated so that no text appears twice.

Each side lives in one worker process for the whole run (imports once, each configuration built
once, untimed). A group of configurations is measured in rounds: every member once per round
for `--seconds` of training, the order alternating between rounds (benchmarks/interleave.py), and
`--repeats` rounds. Each comparison is the median of its per-round ratios, with their quartiles
and range. Sections:

- main: embedkit as configured by default (conf/: the fast paths' defaults are read from there)
  against SentenceTransformerTrainer + MultipleNegativesRankingLoss at batch 32 and 128;
- fastpaths: at batch 128, in the same rounds as main's batch 128, embedkit with one fast-path
  switch flipped from its default (length-grouped batches, unpadded encoding, torch.compile,
  fused AdamW; `--fast-paths` adds `attn`, SDPA against eager attention);
- encode: TextEncoder.encode against SentenceTransformer.encode (4,000 texts, batch 128);
- gradcache (not in the default run): GradCache (mini-batch 128) against
  CachedMultipleNegativesRankingLoss at batch 512;
- memory (not in the default run): peak RSS of GradCache at batch 19,200 (max length 32) against
  the uncached batch 256, each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("EMBEDKIT_BENCH_DIR", ROOT / ".cache" / "bench_interleaved"))
DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", ROOT.parent / "shared" / "data" / "zh-mini"))
TRAIN_FILES = ("cmrc_pairs", "nli_triplets", "afqmc_pairs", "stsb_hardneg")
MAX_LEN, GC_MINI_BATCH = 128, 128
DEFAULT_SECTIONS = ("main", "fastpaths", "encode")
ALL_SECTIONS = ("main", "fastpaths", "encode", "gradcache", "memory")
#: Fast-path switch -> (what it is, its config key). The default value comes from conf/.
FAST_PATHS = {
    "group_by_length": ("length-grouped batches", "data.group_by_length"),
    "unpad": ("unpadded encoding", "model.encoder.unpad"),
    "compile": ("torch.compile of the backbone", "model.encoder.compile"),
    "fused": ("fused AdamW", "objective.optimizer.fused"),
    "attn": ("SDPA attention (off: eager)", "model.encoder.attn_implementation"),
}
DEFAULT_FAST_PATHS = ("group_by_length", "unpad", "compile", "fused")


# ---------------------------------------------------------------------- shared inputs


def build_pairs() -> list[dict]:
    from embedkit.data.readers import read_retrieval_jsonl

    seen, pairs = set(), []
    for name in TRAIN_FILES:
        for row in read_retrieval_jsonl(DATA / "train" / f"{name}.jsonl"):
            q, p = row["query"].strip(), row["pos"][0].strip()
            if q and p and q != p and q not in seen and p not in seen:
                seen.update((q, p))
                pairs.append({"query": q, "pos": [p]})
    return pairs


def prepare() -> dict:
    """The pairs, the tokenizer and the initial model both sides load (built once, reused)."""
    manifest = WORK / "manifest.json"
    if manifest.exists() and (WORK / "model" / "modules.json").exists():
        return json.loads(manifest.read_text())
    import torch

    from embedkit.models.build import tiny_zh_encoder
    from embedkit.models.export import export_sentence_transformers
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    pairs = build_pairs()
    (WORK / "pairs.json").write_text(json.dumps(pairs, ensure_ascii=False))
    tok = save_tokenizer(build_char_vocab([t for r in pairs for t in (r["query"], *r["pos"])]),
                         WORK / "tokenizer")
    torch.manual_seed(0)
    enc = tiny_zh_encoder(tok, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                          dropout=0.1, pooling="mean", max_length=MAX_LEN)
    export_sentence_transformers(enc, WORK / "model")
    lengths = [len(tok(t, truncation=True, max_length=MAX_LEN)["input_ids"])
               for r in pairs for t in (r["query"], r["pos"][0])]
    info = {"pairs": len(pairs), "files": [f"train/{n}.jsonl" for n in TRAIN_FILES],
            "vocab": len(tok), "tokens_mean": sum(lengths) / len(lengths),
            "tokens_at_cap": sum(n >= MAX_LEN for n in lengths) / len(lengths)}
    manifest.write_text(json.dumps(info))
    return info


def embedkit_defaults(overrides: list[str] = ()) -> dict:
    """The fast-path switches as conf/train.yaml composes them (by default, or with `overrides`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from embedkit.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    enc = cfg.model.encoder
    return {"group_by_length": bool(cfg.data.group_by_length), "unpad": bool(enc.get("unpad", False)),
            "compile": bool(enc.get("compile", False)), "attn": str(enc.get("attn_implementation", "sdpa")),
            "fused": cfg.objective.optimizer.get("fused", None)}


def flipped(switch: str, value):
    if switch == "attn":
        return "eager" if value != "eager" else "sdpa"
    if switch == "fused":
        return False if value == "auto" or value is True else "auto"
    return not value


# ---------------------------------------------------------------------- the plan


def plan(args, defaults: dict) -> list[dict]:
    """Groups of members measured in the same rounds: {name, section, members: {label: spec},
    comparisons: [(member, reference, kind)]} (kind: "st" = against sentence-transformers,
    or the fast-path switch flipped in `member`)."""
    sections = set(args.sections)
    b_small, b_large = (8, 16) if args.quick else (32, 128)
    max_len = 32 if args.quick else MAX_LEN
    train = lambda side, batch, **kw: {"side": side, "kind": "train", "batch": batch,
                                       "max_len": kw.pop("max_len", max_len),
                                       **({"switches": kw.pop("switches")} if side == "embedkit" else {}),
                                       **kw}
    groups = []
    if "main" in sections:
        groups.append({"name": f"batch {b_small}", "section": "main",
                       "members": {"embedkit": train("embedkit", b_small, switches=defaults),
                                   "st": train("st", b_small)},
                       "comparisons": [("embedkit", "st", "st")]})
    if "main" in sections or "fastpaths" in sections:
        members = {"embedkit": train("embedkit", b_large, switches=defaults), "st": train("st", b_large)}
        comparisons = [("embedkit", "st", "st")] if "main" in sections else []
        if "fastpaths" in sections:
            for switch in args.fast_paths:
                reference = "embedkit"
                sw = {**defaults, switch: flipped(switch, defaults[switch])}
                if switch == "attn" and defaults["unpad"]:
                    # unpadded encoding runs its own attention: compare the two backends without it
                    reference = "unpad=" + _show(False)
                    members.setdefault(reference, train("embedkit", b_large, switches={**defaults, "unpad": False}))
                    sw["unpad"] = False
                label = f"{switch}={_show(sw[switch])}"
                members[label] = train("embedkit", b_large, switches=sw)
                comparisons.append((label, reference, switch))
                comparisons.append((label, "st", "st"))
        groups.append({"name": f"batch {b_large}", "section": "main" if "main" in sections else "fastpaths",
                       "members": members, "comparisons": comparisons})
    if "gradcache" in sections:
        batch, mini = (32, 8) if args.quick else (512, GC_MINI_BATCH)
        groups.append({"name": f"GradCache batch {batch}", "section": "gradcache",
                       "members": {"embedkit": train("embedkit", batch, switches=defaults, grad_cache=mini),
                                   "st": train("st", batch, grad_cache=mini)},
                       "comparisons": [("embedkit", "st", "st")]})
    if "encode" in sections:
        texts = 256 if args.quick else 4000
        enc = lambda side: {"side": side, "kind": "encode", "batch": b_large, "max_len": max_len,
                            "texts": texts, **({"switches": defaults} if side == "embedkit" else {})}
        groups.append({"name": "encode", "section": "encode",
                       "members": {"embedkit": enc("embedkit"), "st": enc("st")},
                       "comparisons": [("embedkit", "st", "st")],
                       "seconds": max(1.0, args.seconds / 3)})
    return groups


def _show(v) -> str:
    return {True: "on", False: "off", None: "off"}.get(v, str(v)) if not isinstance(v, str) else v


# ---------------------------------------------------------------------- the workers


class Worker:
    """One side's worker process (benchmarks/bench_sides.py `serve`), fed one command a line."""

    def __init__(self, side: str, log: Path):
        self.side, self.log = side, log
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True)

    def run(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
            if line.startswith("ERROR "):
                raise SystemExit(f"the {self.side} worker failed on {cmd['spec']}:\n"
                                 f"{json.loads(line[len('ERROR '):])}")
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        raise SystemExit(f"the {self.side} worker exited (code {self.proc.wait()}); {self.log}:\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def measure(groups: list[dict], args) -> list[dict]:
    """Every group's rounds; one result per (group, round, member)."""
    from interleave import round_order

    WORK.mkdir(parents=True, exist_ok=True)
    workers = {side: Worker(side, WORK / f"worker-{side}.log") for side in ("embedkit", "st")}
    results = []
    try:
        for group in groups:
            seconds = group.get("seconds", args.seconds)
            for r in range(args.repeats):
                for label in round_order(list(group["members"]), r):
                    spec = group["members"][label]
                    load = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    out = workers[spec["side"]].run({"spec": spec, "seconds": seconds, "warmup": args.warmup,
                                                     "first_warmup": args.first_warmup, "seed": r})
                    results.append({**out, "group": group["name"], "section": group["section"],
                                    "round": r, "member": label, "load_avg_1min": load,
                                    "wall_s": time.perf_counter() - t0})
                    print(f"{group['name']:>16} round {r} {label:<22} {out['samples_per_s']:8.1f} /s "
                          f"({time.perf_counter() - t0:5.1f} s, load {load:.2f})", flush=True)
    finally:
        for w in workers.values():
            w.close()
    return results


# ---------------------------------------------------------------------- memory (fresh processes)


def memory_plan(quick: bool) -> list[dict]:
    big, small, steps = (256, 32, 2) if quick else (19_200, 256, 2)
    mini = 16 if quick else GC_MINI_BATCH
    return [{"label": f"embedkit GradCache {big:,}", "side": "embedkit", "kind": "train", "batch": big,
             "max_len": 32, "grad_cache": mini, "steps": steps},
            {"label": f"embedkit uncached {small}", "side": "embedkit", "kind": "train", "batch": small,
             "max_len": 32, "grad_cache": None, "steps": 6},
            {"label": f"st CachedMNRL {big:,}", "side": "st", "kind": "train", "batch": big,
             "max_len": 32, "grad_cache": mini, "steps": steps}]


def run_memory_one(spec: dict, defaults: dict) -> dict:
    """One memory configuration in this (fresh) process: `steps` steps, peak RSS."""
    from bench_sides import SESSIONS

    pairs = json.loads((WORK / "pairs.json").read_text())
    while len(pairs) < spec["batch"]:   # 19,200 rows from 16k pairs: repeated rows, same memory
        pairs = pairs + pairs[:spec["batch"] - len(pairs)]
    spec = {**spec, **({"switches": defaults} if spec["side"] == "embedkit" else {})}
    session = SESSIONS[(spec["side"], "train")](spec, pairs, WORK)
    before = _peak_rss_mib()
    out = session.run(0.0, 0, seed=0, min_timed=spec["steps"] - 1)
    return {**out, "peak_rss_mib": _peak_rss_mib(), "rss_before_train_mib": before}


def measure_memory(quick: bool, defaults: dict) -> list[dict]:
    out = []
    for spec in memory_plan(quick):
        proc = subprocess.run([sys.executable, __file__, "--memory-one", json.dumps(spec),
                               "--defaults", json.dumps(defaults)], cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"memory configuration {spec['label']} failed (exit {proc.returncode})")
        out.append({**spec, **json.loads(lines[-1][len("RESULT "):])})
        print(f"  memory {spec['label']:<28} peak RSS {out[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------- the machine


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "pytorch_lightning", "transformers", "sentence_transformers", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / 2**30,
            "torch_threads": int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)),
            "python": platform.python_version(), "versions": versions,
            "load_avg_at_start": os.getloadavg()}


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per group (default 5)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="timed training per measurement (default 30; encoding: a third)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every measurement")
    parser.add_argument("--first-warmup", type=int, default=4,
                        help="untimed steps when a configuration is built (a compile happens there)")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, of {','.join(ALL_SECTIONS)} (or 'all')")
    parser.add_argument("--fast-paths", default=",".join(DEFAULT_FAST_PATHS),
                        help=f"switches flipped in the fastpaths section, of {','.join(FAST_PATHS)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 2 rounds of 2 s: checks that every configuration runs")
    parser.add_argument("--out", help="the report (default benchmarks/RESULTS.md; with --quick or short "
                                      "repeats, .cache/bench_interleaved/RESULTS.md)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from its .json without measuring again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)
    parser.add_argument("--defaults", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        from bench_sides import serve

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
        serve(args.worker, WORK, sys.stdin, sys.stdout)
        return
    if args.memory_one:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
        print("RESULT " + json.dumps(run_memory_one(json.loads(args.memory_one), json.loads(args.defaults))),
              flush=True)
        return
    if args.quick:
        args.repeats, args.seconds = 2, 2.0
    args.sections = list(ALL_SECTIONS) if args.sections == "all" else args.sections.split(",")
    args.fast_paths = [s for s in args.fast_paths.split(",") if s]
    for name in args.sections:
        if name not in ALL_SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(ALL_SECTIONS)}")
    for name in args.fast_paths:
        if name not in FAST_PATHS:
            parser.error(f"unknown fast path {name!r}; choose from {', '.join(FAST_PATHS)}")
    full = not args.quick and args.repeats >= 5 and args.seconds >= 30
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "RESULTS.md" if full else WORK / "RESULTS.md")
    from bench_report import report

    if args.report_only:
        raw = json.loads(out.with_suffix(".json").read_text())
        out.write_text(report(raw))
        return
    started = time.perf_counter()
    data = prepare()
    defaults = embedkit_defaults()
    info = machine()
    groups = plan(args, defaults)
    results = measure(groups, args) if groups else []
    memory = measure_memory(args.quick, defaults) if "memory" in args.sections else []
    info["bench_minutes"] = (time.perf_counter() - started) / 60
    info["load_avg_at_end"] = os.getloadavg()
    raw = {"machine": info, "data": data, "defaults": defaults, "fast_paths": FAST_PATHS,
           "settings": {"repeats": args.repeats, "seconds": args.seconds, "warmup": args.warmup,
                        "first_warmup": args.first_warmup, "sections": args.sections,
                        "quick": args.quick, "full": full,
                        "command": " ".join(["python", "benchmarks/bench_contrastive.py", *sys.argv[1:]])},
           "groups": [{k: g[k] for k in ("name", "section", "members", "comparisons")} for g in groups],
           "results": results, "memory": memory}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    out.write_text(report(raw))
    print(f"wrote {out} ({info['bench_minutes']:.1f} min)")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    main()
