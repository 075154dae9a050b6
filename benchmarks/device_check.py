"""One prepared check for a CUDA machine: speed, GradCache numerics, faiss-gpu and a 19,200 batch.

    make device-check                                # on the GPU machine: RESULTS_device.md + .json
    python benchmarks/device_check.py --dry          # CPU, tiny sizes, seconds: the same report shape

Written to be run once, unattended, in at most 8 minutes on one H200. Every section runs in its
own forked process with a hard time cap (SECTIONS), so a section that raises, runs out of memory,
crashes the CUDA context or hangs is recorded as failed with its reason and the others still run;
the sections that adapt (throughput) also stop early by a soft deadline. The parent imports the
libraries and never touches the GPU (a CUDA context does not survive a fork).

Sections, in order:

1. environment: GPU, driver, torch/CUDA, flash-attn and faiss builds; builds the encoder every
   later section loads, bert-base-sized from a config (hidden 768, 12 layers, 12 heads, FFN 3072,
   a 21,101-entry character vocabulary of the CJK block: no hub), exported once for both sides.
2. gradcache_dropout: GradCache with dropout 0.1 on CUDA: the replayed chunks' embeddings equal
   the first pass's, and its parameter gradients equal an uncached step's taken with the same
   dropout masks (each chunk embedded with grad under the same RNG state), plain and unpadded.
3. fp16_gradcache: a Lightning step at 16-mixed with GradCache (the GradScaler's scaled
   surrogate backward, then unscaling): finite gradients, equal to the fp32 step's within fp16's
   tolerance.
4. faiss: faiss-gpu against faiss-cpu on the same exact inner-product index (skipped, with the
   reason, where faiss has no GPU support).
5. big_batch: one InfoNCE step at batch 19,200 (length 128, bf16) with GradCache (mini-batch
   128) and its peak GPU memory, against an uncached batch of 256.
6. throughput: bf16 training samples/s and MFU of embedkit against sentence-transformers on the
   same GPU, interleaved rounds (benchmarks/interleave.py) at fixed lengths 128 and 512, plus the
   fast paths: bf16 against fp32, torch.compile, and unpadded encoding on mixed lengths 16-128.

MFU counts the model FLOPs of a training step, 3 × (forward matmuls), per sequence of length L:
6·L·(12·h²)·layers for the dense layers plus 12·L²·h·layers for attention's QKᵀ and AV, over the
GPU's dense bf16 peak (PEAK_BF16).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
TOTAL_CAP_S = 450          # the sections together; with the imports before them, under 8 min
#: name -> hard cap in seconds on a GPU (dry mode: DRY_CAP_S each); None: what is left of the total
SECTIONS = {"environment": 45, "gradcache_dropout": 40, "fp16_gradcache": 40, "faiss": 30,
            "big_batch": 90, "throughput": None}
DRY_CAP_S = 40
#: dense bf16 peak FLOP/s by GPU name fragment (vendor data sheets, SXM parts, no sparsity)
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12,
             "L40S": 362.1e12, "A10": 125.0e12}
CJK = (0x4E00, 0x9FFF + 1)


# ---------------------------------------------------------------------- sizes


def sizes(dry: bool) -> dict:
    if dry:
        return {"model": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                "chars": 400, "lengths": (16, 32), "batch": {16: 16, 32: 8}, "mixed": (4, 16),
                "seconds": 0.3, "rounds": 1, "gc_batch": 32, "gc_mini": 8, "fp16_steps": 3,
                "big": 128, "big_mini": 16, "small": 16, "big_len": 16,
                "faiss": (2000, 32, 64), "pairs": 256}
    return {"model": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
            "chars": CJK[1] - CJK[0], "lengths": (128, 512), "batch": {128: 256, 512: 64},
            "mixed": (16, 128), "seconds": 3.0, "rounds": 3, "gc_batch": 64, "gc_mini": 16, "fp16_steps": 8,
            "big": 19_200, "big_mini": 128, "small": 256, "big_len": 128,
            "faiss": (100_000, 768, 2000), "pairs": 8192}


def chars(n: int) -> list[str]:
    return [chr(c) for c in range(CJK[0], CJK[0] + n)]


def fixed_pairs(n: int, length: int, alphabet: list[str], seed: int) -> list[dict]:
    """`n` pairs of texts of exactly `length` tokens ([CLS] + length-2 characters + [SEP])."""
    rng = random.Random(seed)
    text = lambda: "".join(rng.choices(alphabet, k=length - 2))
    return [{"query": text(), "pos": [text()]} for _ in range(n)]


def mixed_pairs(n: int, lo: int, hi: int, alphabet: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    text = lambda: "".join(rng.choices(alphabet, k=rng.randint(lo, hi) - 2))
    return [{"query": text(), "pos": [text()]} for _ in range(n)]


# ---------------------------------------------------------------------- 1. environment


def environment(ctx) -> dict:
    import torch

    from embedkit.models.build import tiny_zh_encoder
    from embedkit.models.export import export_sentence_transformers
    from embedkit.models.unpadded import flash_attn_available
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    sz, work = ctx["sizes"], Path(ctx["work"])
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "flash_attn": flash_attn_available()}
    for name in ("transformers", "sentence_transformers", "pytorch_lightning", "faiss"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    info["faiss_gpu"] = _faiss_gpu()
    if ctx["device"] == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch (torch.cuda.is_available() is False); "
                               "run --dry on a CPU machine")
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    driver=_nvidia_smi("driver_version"))
    vocab = build_char_vocab(["".join(chars(sz["chars"]))])
    tok = save_tokenizer(vocab, work / "tokenizer")
    torch.manual_seed(0)
    enc = tiny_zh_encoder(tok, **sz["model"], dropout=0.1, pooling="cls", max_length=max(sz["lengths"]),
                          max_position_embeddings=512)
    export_sentence_transformers(enc, work / "model")
    params = sum(p.numel() for p in enc.parameters())
    info.update(vocab=len(tok), parameters=params, model=sz["model"])
    return {"status": "ok", "summary": f"{info.get('gpu', 'CPU')}; encoder {params:,} parameters, "
                                       f"vocabulary {len(tok):,}", "metrics": info}


def _faiss_gpu() -> str:
    try:
        import faiss
    except ImportError:
        return "faiss not installed"
    if not hasattr(faiss, "StandardGpuResources"):
        return f"no: faiss {faiss.__version__} is a CPU build"
    return f"yes, {faiss.get_num_gpus()} GPU(s)"


def _nvidia_smi(field: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _tokenizer(ctx):
    from embedkit.models.vocab import load_tokenizer

    path = Path(ctx["work"]) / "tokenizer"
    if not (path / "vocab.txt").exists():
        raise RuntimeError("no tokenizer: the environment section did not build one")
    return load_tokenizer(path)


# ---------------------------------------------------------------------- 2. GradCache + dropout


def gradcache_dropout(ctx) -> dict:
    import torch

    from embedkit.models.build import tiny_zh_encoder
    from embedkit.objectives.gradcache import GradCache
    from embedkit.objectives.infonce import InfoNCE

    sz, dev = ctx["sizes"], ctx["device"]
    tok = _tokenizer(ctx)
    pairs = mixed_pairs(sz["gc_batch"], *sz["mixed"], chars(sz["chars"]), seed=1)
    batch = {side: {k: v.to(dev) for k, v in tok(texts, padding=True, return_tensors="pt").items()
                    if k in ("input_ids", "attention_mask")}
             for side, texts in (("query", [p["query"] for p in pairs]), ("passages", [p["pos"][0] for p in pairs]))}
    rows, checks = [], []
    for unpad in (False, True):
        torch.manual_seed(0)
        enc = tiny_zh_encoder(tok, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                              dropout=0.1, pooling="mean", unpad=unpad).to(dev)
        module = InfoNCE(enc, temperature=0.05).to(dev).train()
        gc = GradCache(mini_batch=sz["gc_mini"])
        # The cached step: pass 1 (no grad, RNG state saved per chunk), pass 2, replays.
        torch.manual_seed(1)
        module.zero_grad(set_to_none=True)
        loss, first, leaves, chunks = gc.loss_and_cache(module, batch)
        keys = list(leaves)
        grads = dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys])))
        replay_diff, exact = 0.0, True
        for side, (a, b), state in chunks:
            with state.replay(), torch.no_grad():
                again = module.embed_tokens(side, {k: v[a:b] for k, v in batch[side].items()})[side]
            exact &= bool(torch.equal(again, first[side][a:b].detach()))
            replay_diff = max(replay_diff, float((again - first[side][a:b].detach()).abs().max()))
        gc.replay(module, batch, chunks, grads, backward=lambda s: s.backward())
        got = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        # The uncached step with the same dropout masks: every chunk embedded with grad under the
        # RNG state pass 1 saved for it, one loss over the whole batch, one backward.
        module.zero_grad(set_to_none=True)
        parts: dict[str, list] = {}
        for side, (a, b), state in chunks:
            with state.replay():
                parts.setdefault(side, []).append(
                    module.embed_tokens(side, {k: v[a:b] for k, v in batch[side].items()})[side])
        ref_loss = module.loss_from_embeddings({k: torch.cat(v) for k, v in parts.items()}, batch)
        ref_loss.backward()
        ref = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        scale = max(float(g.abs().max()) for g in ref.values())
        rel = max(float((got[n] - g).abs().max()) for n, g in ref.items()) / scale
        with torch.no_grad():
            p1 = module.embed_tokens("query", batch["query"])["query"]
            p2 = module.embed_tokens("query", batch["query"])["query"]
        dropout_active = not torch.equal(p1, p2)
        label = "unpadded" if unpad else "padded"
        rows.append([label, "yes" if exact else "no", f"{replay_diff:.2e}", f"{rel:.2e}",
                     f"{abs(float(loss) - float(ref_loss)):.2e}", "yes" if dropout_active else "no"])
        checks += [{"name": f"{label}: replayed embeddings equal the first pass", "passed": exact,
                    "detail": f"max |Δ| {replay_diff:.2e}"},
                   {"name": f"{label}: gradients equal the uncached step with the same masks",
                    "passed": rel <= 1e-5, "detail": f"max |Δ| / max |g| = {rel:.2e} (≤ 1e-5, float32)"},
                   {"name": f"{label}: dropout is on (two plain passes differ)", "passed": dropout_active,
                    "detail": ""}]
    return {"status": "ok" if all(c["passed"] for c in checks) else "failed",
            "summary": f"{sum(c['passed'] for c in checks)}/{len(checks)} checks passed",
            "checks": checks,
            "tables": [{"title": f"GradCache (mini-batch {sz['gc_mini']}) with dropout 0.1, batch {sz['gc_batch']}, "
                                 f"4-layer 256-wide encoder, float32, on {dev}",
                        "columns": ["encoding", "replay bitwise equal", "replay max abs Δ",
                                    "grad max abs Δ / max abs g", "loss abs Δ", "dropout active"],
                        "rows": rows}]}


# ---------------------------------------------------------------------- 3. fp16 + GradCache


def fp16_gradcache(ctx) -> dict:
    import pytorch_lightning as pl
    import torch

    from embedkit.models.build import tiny_zh_encoder
    from embedkit.objectives.infonce import InfoNCE

    sz, dev = ctx["sizes"], ctx["device"]
    tok = _tokenizer(ctx)
    pairs = mixed_pairs(sz["gc_batch"], *sz["mixed"], chars(sz["chars"]), seed=2)
    batch = {side: {k: v for k, v in tok(texts, padding=True, return_tensors="pt").items()
                    if k in ("input_ids", "attention_mask")}
             for side, texts in (("query", [p["query"] for p in pairs]), ("passages", [p["pos"][0] for p in pairs]))}
    out = {}
    for precision in ("32-true", "16-mixed"):
        torch.manual_seed(0)
        module = InfoNCE(tiny_zh_encoder(tok, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                                         dropout=0.0, pooling="mean"), temperature=0.05,
                         grad_cache={"mini_batch": sz["gc_mini"]})
        seen = {"skipped": 0}

        class Capture(pl.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                # Lightning has unscaled the gradients before this hook (non-fused optimiser). A
                # step that overflowed at the scaler's current scale is skipped by the scaler and
                # the scale halved: the parameters are still the initial ones, so the first
                # finite step is compared with the fp32 step on the same weights.
                grads = {n: p.grad.detach().float().cpu().clone()
                         for n, p in pl_module.named_parameters() if p.grad is not None}
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
                    seen["skipped"] += 1
                    return
                seen.update(grads=grads, scale=float(scaler.get_scale()) if scaler is not None else None)
                trainer.should_stop = True

        trainer = pl.Trainer(accelerator="gpu" if dev == "cuda" else "cpu", devices=1, precision=precision,
                             max_steps=sz["fp16_steps"], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()],
                             default_root_dir=tempfile.mkdtemp())
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
        if "grads" not in seen:
            raise RuntimeError(f"{precision}: no step with finite gradients in {sz['fp16_steps']} steps "
                               f"({seen['skipped']} overflowed)")
        out[precision] = {**seen, "loss": float(trainer.callback_metrics["train/loss"])}
    ref, half = out["32-true"]["grads"], out["16-mixed"]["grads"]
    finite = all(bool(torch.isfinite(g).all()) for g in half.values())
    scale = max(float(g.abs().max()) for g in ref.values())
    rel = max(float((half[n] - g).abs().max()) for n, g in ref.items()) / scale
    loss_rel = abs(out["16-mixed"]["loss"] - out["32-true"]["loss"]) / abs(out["32-true"]["loss"])
    loss_scale = out["16-mixed"]["scale"]
    skipped = out["16-mixed"]["skipped"]
    checks = [{"name": "fp16 gradients are finite after unscaling", "passed": finite,
               "detail": f"steps before it that overflowed (skipped by the scaler): {skipped}"},
              # fp16 rounds the τ-scaled scores (up to 1/τ = 20) to ~1e-2, so gradients agree to a
              # few per cent; a loss-scaling error (unscaled, scaled twice, or an accumulation
              # factor lost) is off by a factor of 2 to 65,536.
              {"name": "fp16 gradients equal the fp32 step's within 1e-1 of the largest",
               "passed": rel <= 1e-1, "detail": f"max |Δ| / max |g| = {rel:.2e}"},
              {"name": "fp16 loss equals the fp32 loss within 1e-2", "passed": loss_rel <= 1e-2,
               "detail": f"relative |Δ| = {loss_rel:.2e}"}]
    if dev == "cuda":
        checks.append({"name": "a loss scale was applied (GradScaler)", "passed": bool(loss_scale and loss_scale > 1),
                       "detail": f"scale {loss_scale}"})
    return {"status": "ok" if all(c["passed"] for c in checks) else "failed",
            "summary": f"{sum(c['passed'] for c in checks)}/{len(checks)} checks passed; loss scale {loss_scale}",
            "checks": checks,
            "notes": [] if dev == "cuda" else ["dry: Lightning's 16-mixed on CPU has no GradScaler, so no "
                                               "loss scale is applied here"],
            "metrics": {"loss_fp32": out["32-true"]["loss"], "loss_fp16": out["16-mixed"]["loss"],
                        "grad_rel_err": rel, "loss_scale": loss_scale, "overflowed_steps": skipped}}


# ---------------------------------------------------------------------- 4. faiss


def faiss_section(ctx) -> dict:
    import numpy as np

    from embedkit.mining.ann import build_index, search

    gpu = _faiss_gpu()
    if not ctx["dry"] and not gpu.startswith("yes"):
        return {"status": "skipped", "summary": f"faiss has no GPU here ({gpu}); nothing to compare",
                "reason": gpu}
    n, dim, nq = ctx["sizes"]["faiss"]
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(n, nq, replace=False)] + 0.1 * rng.standard_normal((nq, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 100
    t0 = time.perf_counter()
    s_cpu, i_cpu = search(build_index(base, use_gpu=False), queries, k)
    t_cpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    other = not ctx["dry"]
    s_gpu, i_gpu = search(build_index(base, use_gpu=other), queries, k)
    t_gpu = time.perf_counter() - t0
    same_ids = float((i_cpu == i_gpu).mean())
    same_sets = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(i_cpu, i_gpu)]))
    score_diff = float(np.abs(s_cpu - s_gpu).max())
    checks = [{"name": "top-100 scores equal within 1e-4", "passed": score_diff <= 1e-4,
               "detail": f"max |Δ| {score_diff:.2e}"},
              {"name": "top-100 neighbour sets agree (≥ 99.9 %; near-ties may swap at the cut)",
               "passed": same_sets >= 0.999, "detail": f"{100 * same_sets:.3f} %"}]
    what = "faiss-cpu vs faiss-cpu (dry: exercises the comparison only)" if ctx["dry"] else "faiss-gpu vs faiss-cpu"
    return {"status": "ok" if all(c["passed"] for c in checks) else "failed",
            "summary": f"{what}: ids in the same rank {100 * same_ids:.2f} %, sets {100 * same_sets:.3f} %",
            "checks": checks,
            "tables": [{"title": f"{what}, IndexFlatIP over {n:,} × {dim} unit vectors, {nq:,} queries, k = {k}",
                        "columns": ["", "build + search s"],
                        "rows": [["faiss-cpu", f"{t_cpu:.2f}"], ["other side", f"{t_gpu:.2f}"]]}]}


# ---------------------------------------------------------------------- 5. a 19,200 batch


def big_batch(ctx) -> dict:
    import torch

    from bench_sides import EmbedkitTraining

    sz, dev, work = ctx["sizes"], ctx["device"], Path(ctx["work"])
    switches = ctx["defaults"]
    pairs = fixed_pairs(sz["big"], sz["big_len"], chars(sz["chars"]), seed=3)
    rows, mem = [], {}
    for label, batch, mini in ((f"uncached {sz['small']}", sz["small"], None),
                               (f"GradCache {sz['big']:,} (mini-batch {sz['big_mini']})", sz["big"], sz["big_mini"])):
        spec = {"side": "embedkit", "kind": "train", "batch": batch, "max_len": sz["big_len"], "switches": switches,
                "grad_cache": mini, "device": dev, "precision": "bf16"}
        session = EmbedkitTraining(spec, pairs[:max(batch, sz["small"])], work)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = session.run(0.0, 0, seed=0, min_timed=1)   # two steps: the second is timed
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
        mem[label] = peak
        rows.append([label, f"{result['samples_per_s']:.1f}", f"{result['s_per_step']:.2f}",
                     f"{peak:.2f}" if peak is not None else "n/a (CPU)"])
        del session
    labels = list(mem)
    ratio = mem[labels[1]] / mem[labels[0]] if dev == "cuda" else None
    return {"status": "ok",
            "summary": (f"batch {sz['big']:,} trained; peak memory {ratio:.2f}× that of batch {sz['small']}"
                        if ratio is not None else "dry: both steps ran; no GPU memory to measure"),
            "metrics": {"peak_gib": mem, "ratio": ratio},
            "tables": [{"title": f"Two steps, the second timed, length {sz['big_len']}, bf16-mixed, "
                                 "peak memory = torch.cuda.max_memory_allocated over both steps",
                        "columns": ["configuration", "samples/s", "s/step", "peak GiB"], "rows": rows}]}


# ---------------------------------------------------------------------- 6. throughput


def throughput(ctx) -> dict:
    from bench_sides import SESSIONS
    from interleave import paired_ratios, round_order, spread

    sz, dev, work = ctx["sizes"], ctx["device"], Path(ctx["work"])
    defaults = ctx["defaults"]
    alphabet = chars(sz["chars"])
    cfg = ctx["model_cfg"]
    groups = []
    for length in sz["lengths"]:
        b = sz["batch"][length]
        spec = lambda side, **kw: {"side": side, "kind": "train", "batch": b, "max_len": length,
                                   "device": dev, "precision": kw.pop("precision", "bf16"),
                                   **({"switches": {**defaults, **kw}} if side == "embedkit" else {})}
        members = {"embedkit": spec("embedkit"), "st": spec("st")}
        if length == sz["lengths"][0]:
            members["embedkit fp32"] = spec("embedkit", precision="32")
            if not ctx["dry"]:   # a compile takes minutes on 2 cores; on the GPU machine, tens of seconds
                members["embedkit compile"] = spec("embedkit", compile=True)
        groups.append({"name": f"length {length}", "length": length, "batch": b, "fixed": True, "members": members,
                       "pairs": fixed_pairs(sz["pairs"], length, alphabet, seed=length)})
    lo, hi = sz["mixed"]
    b = sz["batch"][sz["lengths"][0]]
    spec = lambda side, **kw: {"side": side, "kind": "train", "batch": b, "max_len": hi, "device": dev,
                               "precision": "bf16", **({"switches": {**defaults, **kw}} if side == "embedkit" else {})}
    groups.append({"name": f"lengths {lo}-{hi}", "length": None, "batch": b, "fixed": False,
                   "members": {"embedkit": spec("embedkit", unpad=False), "embedkit unpad": spec("embedkit", unpad=True),
                               "st": spec("st")},
                   "pairs": mixed_pairs(sz["pairs"], lo, hi, alphabet, seed=7)})
    results, skipped = [], []
    sessions = {}
    # Round-major, so that the soft deadline drops last rounds, never a whole group.
    for r in range(sz["rounds"]):
        for g in groups:
            for label in round_order(list(g["members"]), r):
                if time.time() > ctx["deadline"]:
                    skipped.append(f"{g['name']} round {r} {label}")
                    continue
                spec = g["members"][label]
                key = (g["name"], label)
                if key not in sessions:
                    sessions[key] = SESSIONS[(spec["side"], "train")](spec, g["pairs"], work)
                    sessions[key].run(0.0, 2, seed=100, min_timed=0)   # untimed: build, compile, first steps
                out = sessions[key].run(sz["seconds"], 1, seed=r)
                results.append({**out, "group": g["name"], "round": r, "member": label})
    rows = []
    for g in groups:
        rs = [x for x in results if x["group"] == g["name"]]
        for label, spec in g["members"].items():
            mine = [x["samples_per_s"] for x in rs if x["member"] == label]
            if not mine:
                continue
            rate = sorted(mine)[len(mine) // 2]
            vs = {}
            for anchor in ("st", "embedkit"):
                if anchor != label and anchor in g["members"] and spec["side"] == "embedkit":
                    ratios = paired_ratios(rs, label, anchor)
                    if ratios:
                        vs[anchor] = spread(ratios)
            mfu = ""
            if g["fixed"] and spec.get("precision") == "bf16" and ctx.get("peak"):
                flops = 2 * _flops_per_sequence(g["length"], cfg)   # a pair: query + passage
                mfu = f"{100 * rate * flops / ctx['peak']:.1f} %"
            fmt = lambda s: f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})" if s else ""
            rows.append([g["name"], str(g["batch"]), label, spec.get("precision", "bf16"), f"{rate:.1f}", mfu,
                         fmt(vs.get("st")), fmt(vs.get("embedkit"))])
    notes = [f"not measured (soft time limit): {', '.join(skipped)}"] if skipped else []
    optimizers = sorted({f"{x['member']}: {x['optimizer']}" for x in results if x["group"] == groups[0]["name"]})
    notes.append("optimisers as run: " + "; ".join(optimizers) + " (embedkit's fused: auto is off under "
                 "mixed precision, where Lightning cannot clip a fused optimiser; the HF trainer fuses)")
    if ctx["dry"]:
        notes.append("dry: the torch.compile member is left out (its compile takes minutes on 2 cores)")
    if not ctx.get("peak"):
        notes.append("MFU: no dense bf16 peak known for this device (PEAK_BF16)")
    return {"status": "ok", "summary": f"{len(results)} measurements in {len(groups)} groups"
                                       + (f", {len(skipped)} left out by the time cap" if skipped else ""),
            "notes": notes,
            "tables": [{"title": f"Training samples/s, {sz['rounds']} interleaved rounds of {sz['seconds']:g} s; "
                                 "ratio: median of per-round ratios (min–max)",
                        "columns": ["data", "batch", "configuration", "precision", "samples/s", "MFU",
                                    "vs ST", "vs embedkit default"], "rows": rows}],
            "results": results}


def peak_bf16(gpu_name: str | None) -> float | None:
    """The dense bf16 peak of the first PEAK_BF16 entry whose key is in the GPU's name."""
    return next((v for k, v in PEAK_BF16.items() if gpu_name and k in gpu_name), None)


def _flops_per_sequence(length: int, cfg: dict) -> float:
    h, layers = cfg["hidden_size"], cfg["num_layers"]
    ffn = cfg["intermediate_size"]
    dense = 2 * length * (4 * h * h + 2 * h * ffn)    # Q, K, V, O and the two FFN matmuls, forward
    attention = 4 * length * length * h                # QKᵀ and AV, forward
    return 3 * layers * (dense + attention)            # forward + backward (2×)


# ---------------------------------------------------------------------- the runner


def _child(fn, ctx, out_path):
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    try:
        if ctx["device"] == "cpu":
            import torch

            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        result = fn(ctx)
    except BaseException as err:   # noqa: BLE001  recorded; the parent goes on with the next section
        result = {"status": "failed", "summary": f"{type(err).__name__}: {str(err)[:300]}",
                  "reason": traceback.format_exc()[-4000:]}
    Path(out_path).write_text(json.dumps(result, default=str))


def run_sections(sections: dict, ctx: dict, caps: dict, total_cap: float) -> dict:
    """Each section in a forked process under its cap (and what is left of `total_cap`): {name: result}."""
    mp = multiprocessing.get_context("fork")
    results, start = {}, time.time()
    tmp = Path(tempfile.mkdtemp(prefix="device_check_"))
    for name, fn in sections.items():
        left = total_cap - (time.time() - start)
        cap = left if caps[name] is None else min(caps[name], left)
        if cap < min(5, caps[name] or 5):   # too little of the whole cap left to start it
            results[name] = {"status": "failed", "summary": "not run: the whole check's time cap was reached",
                             "seconds": 0.0, "cap_s": cap}
            continue
        out = tmp / f"{name}.json"
        t0 = time.time()
        proc = mp.Process(target=_child, args=(fn, {**ctx, "deadline": t0 + 0.8 * cap}, str(out)))
        proc.start()
        proc.join(cap)
        if proc.is_alive():
            proc.kill()
            proc.join()
            result = {"status": "failed", "summary": f"stopped at its time cap of {cap:.0f} s"}
        elif out.exists():
            result = json.loads(out.read_text())
        else:
            result = {"status": "failed", "summary": f"the section's process died (exit code {proc.exitcode})"}
        result.update(seconds=time.time() - t0, cap_s=cap)
        results[name] = result
        print(f"[device-check] {name}: {result['status']} in {result['seconds']:.0f} s: {result['summary']}",
              flush=True)
    return results


# ---------------------------------------------------------------------- the report


def report(raw: dict) -> str:
    env = raw["sections"].get("environment", {}).get("metrics", {})
    dry = raw["dry"]
    lines = ["# Device check" + (": dry run, CPU, not a measurement" if dry else f": {env.get('gpu', 'unknown GPU')}"), ""]
    if dry:
        lines += ["**Dry run, CPU, not a measurement.** Every section ran with tiny sizes and time limits "
                  "to show that it runs and reports; no number below says anything about a GPU.", ""]
    lines += [f"Written by `{raw['command']}` in {raw['minutes']:.1f} min (cap {TOTAL_CAP_S / 60:.1f} min). "
              + ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda_build", "transformers", "sentence_transformers",
                                                    "pytorch_lightning", "faiss") if k in env)
              + (f"; GPU {env['gpu']} ({env['gpu_memory_gib']:.0f} GiB, compute capability {env['capability']}, "
                 f"driver {env.get('driver')})" if "gpu" in env else "")
              + f"; flash-attn {'installed' if env.get('flash_attn') else 'not installed'}; "
              f"faiss GPU: {env.get('faiss_gpu', '?')}.", "",
              "| section | status | seconds | cap s | summary |", "|---|---|---:|---:|---|"]
    for name, r in raw["sections"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('cap_s', 0):.0f} | "
                     f"{r['summary']} |")
    lines.append("")
    for name, r in raw["sections"].items():
        lines += [f"## {name}", "", f"**{r['status']}**: {r['summary']}", ""]
        for t in r.get("tables", []):
            lines += [t["title"] + ":", "", "| " + " | ".join(t["columns"]) + " |",
                      "|" + "---|" * len(t["columns"])]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
            lines.append("")
        for c in r.get("checks", []):
            lines.append(f"- [{'x' if c['passed'] else ' '}] {c['name']}" + (f": {c['detail']}" if c.get("detail") else ""))
        if r.get("checks"):
            lines.append("")
        for n in r.get("notes", []):
            lines.append(f"- {n}")
        if r.get("notes"):
            lines.append("")
        if r.get("reason") and r["status"] != "skipped":
            lines += ["```text", r["reason"].rstrip(), "```", ""]
    lines += ["Raw results: the .json beside this file. Re-run: `make device-check` "
              "(dry: `python benchmarks/device_check.py --dry`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, seconds: the report's shape, no measurement")
    parser.add_argument("--out", help="the report (default benchmarks/RESULTS_device.md; dry: "
                                      ".cache/device_check_dry/RESULTS_device.md)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
    # Imported once here, before the forks, so no section pays for them; none touches CUDA.
    import faiss  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import sentence_transformers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import bench_sides  # noqa: F401
    from bench_contrastive import embedkit_defaults

    out = Path(args.out) if args.out else (ROOT / ".cache" / "device_check_dry" / "RESULTS_device.md" if args.dry
                                           else ROOT / "benchmarks" / "RESULTS_device.md")
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    work = Path(tempfile.mkdtemp(prefix="device_check_work_"))
    sz = sizes(args.dry)
    name = None
    if not args.dry:
        try:
            import subprocess

            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            name = None
    peak = peak_bf16(name)
    ctx = {"dry": args.dry, "device": "cpu" if args.dry else "cuda", "work": str(work), "sizes": sz,
           "defaults": embedkit_defaults(["model=hf"]), "peak": peak, "model_cfg": sz["model"]}
    fns = {"environment": environment, "gradcache_dropout": gradcache_dropout, "fp16_gradcache": fp16_gradcache,
           "faiss": faiss_section, "big_batch": big_batch, "throughput": throughput}
    caps = {k: (DRY_CAP_S if args.dry else v) for k, v in SECTIONS.items()}
    started = time.time()
    results = run_sections({k: fns[k] for k in names}, ctx, caps, TOTAL_CAP_S)
    raw = {"dry": args.dry, "command": " ".join(["python", "benchmarks/device_check.py", *sys.argv[1:]]),
           "minutes": (time.time() - started) / 60, "peak_bf16_flops": peak, "gpu_name": name,
           "defaults": ctx["defaults"], "sizes": {k: v for k, v in sz.items()}, "sections": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    out.write_text(report(raw))
    print(f"wrote {out} ({raw['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
