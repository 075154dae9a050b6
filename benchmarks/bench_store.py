"""The data store (data.store=arrow) at C-MTP-like scale, per rank with 2 ranks (issue 17).

    python benchmarks/bench_store.py --quick          # 100k pairs
    python benchmarks/bench_store.py --sizes 1000000 10000000

Synthetic FlagEmbedding jsonl {"query", "pos"} (C-Pack's general stage: weak pairs, no negatives):
queries of 8-24 and passages of 40-160 random characters drawn from 3,000 CJK characters (zipf-
weighted), about 330 bytes a row. Per size, in fresh processes, each a rank (rank 0 and 1, run
at the same time, as DDP's ranks start together):

1. build: both ranks start on an empty cache; one builds the store under the lock, the other
   waits and opens it. Time to a ready dataset, per rank.
2. cached start: both ranks again on the built store: time from ContrastiveDataModule() to a
   ready dataset (setup), and to the first batch of the epoch (the epoch's no-duplicate packing
   over all rows happens there).
3. steady batches/s: the rank's slice of each global batch (batch 256 per rank, group size 1,
   query/passage max length 32/128, length grouping and no_duplicates on, as conf/data/weak_pairs),
   collated as training gets it, over 200 batches after the first.

Peak RSS is the process's ru_maxrss (file pages of the mmapped store a rank touched count too);
RssAnon at the end is its own memory, what cannot be shared or dropped. The anchor, in the same
run: the memory path (data.store=memory, the current path) on zh-mini's task files, same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("EMBEDKIT_BENCH_DIR", ROOT / ".cache" / "bench_store"))
DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", ROOT.parent / "shared" / "data" / "zh-mini"))
BATCH, STEPS, RANKS = 256, 200, 2


def synth(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    if path.exists():
        return
    rng = np.random.default_rng(seed)
    chars = np.array([chr(c) for c in range(0x4E00, 0x4E00 + 3000)])
    p = 1.0 / np.arange(1, 3001)
    p /= p.sum()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for start in range(0, n, 10_000):
            k = min(10_000, n - start)
            ql, pl = rng.integers(8, 25, k), rng.integers(40, 161, k)
            text = chars[rng.choice(3000, size=int(ql.sum() + pl.sum()), p=p)]
            cut = np.cumsum(np.stack([ql, pl], 1).reshape(-1))[:-1]
            parts = ["".join(t) for t in np.split(text, cut)]
            fh.write("".join(json.dumps({"query": parts[2 * i], "pos": [parts[2 * i + 1]]},
                                        ensure_ascii=False) + "\n" for i in range(k)))
    tmp.rename(path)


def fabricate_tokens(folder: Path, n: int, seed: int = 0) -> None:
    """A TokenStore folder of `n` rows (query 10-26 and passage 42-130 token ids, one positive
    each, every text distinct) written straight as the arrays `open_tokens` writes, skipping the
    tokeniser (~75 min for 10M rows on 2 cores): the serving path (sampler, hashed duplicate keys,
    packing, collation) at a size whose build this machine cannot afford in a session."""
    import numpy as np

    if (folder / "meta.json").exists():
        return
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, lo, hi in (("query", 10, 27), ("slot", 42, 131)):
        lengths = rng.integers(lo, hi, n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / f"{name}.offsets.npy", offsets)
        ids = np.lib.format.open_memmap(tmp / f"{name}.ids.npy", "w+", np.int32, (int(offsets[-1]),))
        step = 50_000_000
        for a in range(0, len(ids), step):
            ids[a:a + step] = rng.integers(5, 3000, min(step, len(ids) - a), dtype=np.int32)
        ids.flush()
        del ids
        np.save(tmp / f"{name}.hash.npy", rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64))
    np.save(tmp / "row.slot_ptr.npy", np.arange(n + 1, dtype=np.int64))
    np.save(tmp / "row.n_pos.npy", np.ones(n, dtype=np.int64))
    for k in ("n_neg", "n_cand"):
        np.save(tmp / f"row.{k}.npy", np.zeros(n, dtype=np.int64))
    np.save(tmp / "slot.pid.npy", np.arange(n, dtype=np.int64))
    np.save(tmp / "pid.slot.npy", np.arange(n, dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps({"rows": n, "passages": n, "fabricated": True}))
    tmp.rename(folder)


def serve_fabricated(args) -> None:
    """One rank on a fabricated TokenStore: the data module's own serving code from setup on."""
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from embedkit.data.contrastive import ContrastiveDataModule, GroupDataset
    from embedkit.data.store import TokenStore

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    t_import = time.perf_counter()
    dm = ContrastiveDataModule([lambda: []], batch_size=BATCH, train_group_size=1, query_max_len=32,
                               passage_max_len=128, group_by_length=True, no_duplicates=True, seed=0,
                               cache_dir=args.cache, store="arrow")
    dm.attach_tokenizer(tok)
    dm.token_store = TokenStore(Path(args.source))       # what _setup_store opens after the build
    dm.dataset = GroupDataset.from_store(dm.token_store, 1, 0)
    t_setup = time.perf_counter()
    _serve(args, dm, t0, t_import, t_setup)


def tokenizer_dir() -> Path:
    out = WORK / "tokenizer"
    if not (out / "vocab.txt").exists():
        from embedkit.models.vocab import build_char_vocab, save_tokenizer

        save_tokenizer(build_char_vocab([chr(c) for c in range(0x4E00, 0x4E00 + 3000)]), out)
    return out


def rss_anon_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rank_main(args) -> None:
    """One rank: open (or build) the store, then serve STEPS batches of its slice."""
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from embedkit.data.contrastive import ContrastiveDataModule
    from embedkit.data.sources import jsonl_files, zh_mini_jsonl

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    if args.source == "zh_mini":
        sources = [partial(zh_mini_jsonl, data_dir=str(DATA), file=f"train/{f}.jsonl")
                   for f in ("nli_triplets", "stsb_hardneg", "cmrc_pairs")]
    else:
        sources = [partial(jsonl_files, pattern=args.source)]
    t_import = time.perf_counter()
    dm = ContrastiveDataModule(sources, batch_size=BATCH, train_group_size=1, query_max_len=32,
                               passage_max_len=128, group_by_length=True, no_duplicates=True, seed=0,
                               cache_dir=args.cache, store=args.store, store_num_proc=args.num_proc)
    dm.attach_tokenizer(tok)
    dm.setup()
    t_setup = time.perf_counter()
    _serve(args, dm, t0, t_import, t_setup)


def _serve(args, dm, t0: float, t_import: float, t_setup: float) -> None:
    loader = dm.train_dataloader()
    sampler = loader.batch_sampler
    sampler.num_replicas, sampler.rank = RANKS, args.rank
    it = iter(loader)
    next(it)
    t_first = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
        if n == STEPS:
            break
    t_end = time.perf_counter()
    print(json.dumps({"rank": args.rank, "rows": len(dm.dataset), "import_s": t_import - t0,
                      "setup_s": t_setup - t_import, "first_batch_s": t_first - t_import,
                      "batches": n, "batches_per_s": n / (t_end - t_first),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_anon_mib": rss_anon_mib()}))


def ranks(source: str, store: str, cache: Path, num_proc: int) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--source", source,
                               "--store", store, "--cache", str(cache), "--num-proc", str(num_proc)],
                              stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(RANKS)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a rank failed ({p.returncode})")
        out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--source"), ap.add_argument("--store"), ap.add_argument("--cache")
    ap.add_argument("--fabricated", type=int, nargs="*", default=None,
                    help="serve fabricated token stores of these sizes (no build; see fabricate_tokens)")
    args = ap.parse_args()
    if args.rank is not None:
        return serve_fabricated(args) if args.store == "fabricated" else rank_main(args)
    if args.fabricated:
        return fabricated_main(args)
    sizes = args.sizes or ([100_000] if args.quick else [1_000_000, 10_000_000])
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer_dir()
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "load_avg": os.getloadavg(),
                           "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
               "settings": {"batch_per_rank": BATCH, "ranks": RANKS, "steps": STEPS,
                            "num_proc": args.num_proc, "train_group_size": 1}, "runs": {}}
    anchor_cache = WORK / "cache-anchor"
    shutil.rmtree(anchor_cache, ignore_errors=True)
    results["runs"]["anchor memory zh_mini"] = {"cached": ranks("zh_mini", "memory", anchor_cache, args.num_proc)}
    shutil.rmtree(anchor_cache, ignore_errors=True)
    results["runs"]["arrow zh_mini"] = {"build": ranks("zh_mini", "arrow", anchor_cache, args.num_proc),
                                        "cached": ranks("zh_mini", "arrow", anchor_cache, args.num_proc)}
    for n in sizes:
        t = time.perf_counter()
        f = WORK / f"pairs-{n}" / "pairs.jsonl"
        f.parent.mkdir(exist_ok=True)
        synth(f, n)
        cache = WORK / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        results["runs"][f"arrow {n}"] = {"file_mib": f.stat().st_size / 2**20,
                                         "synth_s": time.perf_counter() - t,
                                         "build": ranks(str(f), "arrow", cache, args.num_proc),
                                         "cached": ranks(str(f), "arrow", cache, args.num_proc)}
        du = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        results["runs"][f"arrow {n}"]["store_mib"] = du / 2**20
        print(json.dumps({n: results["runs"][f"arrow {n}"]}), flush=True)
    anchor = max(r["batches_per_s"] for r in results["runs"]["anchor memory zh_mini"]["cached"])
    results["anchor_batches_per_s"] = anchor
    out = ROOT / "benchmarks" / "results" / f"store{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def fabricated_main(args) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer_dir()
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "load_avg": os.getloadavg()},
               "settings": {"batch_per_rank": BATCH, "ranks": RANKS, "steps": STEPS}, "runs": {}}
    for n in args.fabricated:
        folder = WORK / f"fabricated-{n}"
        t = time.perf_counter()
        fabricate_tokens(folder, n)
        du = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        results["runs"][f"fabricated {n}"] = {"fabricate_s": time.perf_counter() - t, "store_mib": du / 2**20,
                                              "cached": ranks(str(folder), "fabricated", WORK, 1)}
        print(json.dumps({n: results["runs"][f"fabricated {n}"]}), flush=True)
    out = ROOT / "benchmarks" / "results" / "store_fabricated.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
