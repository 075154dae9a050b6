"""The two sides of benchmarks/bench_contrastive.py: embedkit and sentence-transformers sessions.

A session is one configuration (side, batch, max length, switches) built once in a worker process
and then run for as many timed repeats as the bench asks; building it (model load, tokenisation,
a torch.compile) is never timed. A training repeat starts a fresh Trainer on the session's model
(a fresh optimiser and schedule, data order seeded by the repeat), trains `warmup` steps untimed,
then times whole steps, data loading included, until `seconds` have passed: samples/s is the
batch size times the timed steps over the time from the end of the last warm-up step to the end
of the last step. Both sides count the token slots of every timed batch (padded width times
rows, queries and passages) and the real tokens among them, so the report can say how much of the
work was padding.

Settings both sides share: InfoNCE at τ = 0.05 = MultipleNegativesRankingLoss at scale 20,
in-batch negatives only, AdamW lr 1e-4 (weight decay 0, betas 0.9/0.999, eps 1e-8) with linear
warm-up over 10 % of a nominal 10,000-step schedule (the repeats stop long before; the schedule
does not change the speed), gradient clipping at norm 1.0. A spec's `device` ("cpu" unless set;
"cuda" for benchmarks/device_check.py, which then waits for the GPU at every step end) and
`precision` ("32" unless set, or "bf16": Lightning's bf16-mixed, the HF trainer's bf16=True).
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

TEMPERATURE, LR, WARMUP_RATIO, CLIP, NOMINAL_STEPS = 0.05, 1e-4, 0.1, 1.0, 10_000


class StepClock:
    """Step-end times and token counts; `done` once `seconds` of timed steps (at least
    `min_timed`) passed after `warmup` untimed ones."""

    def __init__(self, batch: int, warmup: int, seconds: float, min_timed: int = 2, sync=None):
        self.batch, self.warmup, self.seconds, self.min_timed = batch, warmup, seconds, min_timed
        self.sync = sync   # CUDA: a step "ends" when the GPU has finished it
        self.ends: list[float] = []
        self.slots = self.real = 0
        self.started = time.perf_counter()

    def step(self, slots: int, real: int) -> None:
        if self.sync is not None:
            self.sync()
        self.ends.append(time.perf_counter())
        if len(self.ends) > self.warmup:
            self.slots += slots
            self.real += real

    @property
    def done(self) -> bool:
        timed = len(self.ends) - 1 - self.warmup
        return timed >= self.min_timed and self.ends[-1] - self.ends[self.warmup] >= self.seconds

    def result(self) -> dict:
        timed = len(self.ends) - 1 - self.warmup
        if timed < 1 and self.min_timed:
            raise RuntimeError(f"{len(self.ends)} steps ran, {self.warmup} of them warm-up: nothing timed")
        first = self.ends[0] - self.started
        if timed < 1:
            return {"first_step_s": first, "steps": len(self.ends)}
        seconds = self.ends[-1] - self.ends[self.warmup]
        return {"samples_per_s": self.batch * timed / seconds, "timed_steps": timed,
                "timed_s": seconds, "s_per_step": seconds / timed, "first_step_s": first,
                "slots_per_sample": self.slots / (self.batch * timed),
                "real_share": self.real / self.slots if self.slots else None}


def _sync(spec: dict):
    if spec.get("device", "cpu") != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


def _count(masks) -> tuple[int, int]:
    slots = real = 0
    for m in masks:
        slots += int(m.numel())
        real += int(m.sum())
    return slots, real


# ---------------------------------------------------------------------- embedkit


class EmbedkitTraining:
    """embedkit's InfoNCE in Lightning on ContrastiveDataModule's pre-tokenised batches.

    `switches` are the fast paths: unpad, compile (model.encoder.*), fused (objective.optimizer),
    group_by_length (data.*), attn (model.encoder.attn_implementation)."""

    def __init__(self, spec: dict, pairs: list[dict], work: Path):
        import torch

        from embedkit.data.contrastive import ContrastiveDataModule
        from embedkit.models.build import load_encoder
        from embedkit.objectives.infonce import InfoNCE

        sw = spec["switches"]
        encoder = load_encoder(work / "model", unpad=sw["unpad"], compile=sw["compile"])
        if not sw["unpad"]:
            encoder.backbone.config._attn_implementation = sw["attn"]
        self.batch, self.spec = spec["batch"], spec
        self.data = ContrastiveDataModule(
            sources=[], batch_size=spec["batch"], train_group_size=1, query_max_len=spec["max_len"],
            passage_max_len=spec["max_len"], group_by_length=sw["group_by_length"], seed=0,
            cache_dir=str(work / "cache"))
        self.data.use_examples(pairs)
        self.data.attach_tokenizer(encoder.tokenizer)
        optimizer = functools.partial(torch.optim.AdamW, weight_decay=0.0, betas=(0.9, 0.999),
                                      eps=1e-8, fused=sw["fused"])
        gc = spec.get("grad_cache")
        self.module = InfoNCE(encoder, temperature=TEMPERATURE, lr=LR, warmup_ratio=WARMUP_RATIO,
                              optimizer=optimizer, grad_cache={"mini_batch": gc} if gc else None)

    def run(self, seconds: float, warmup: int, seed: int, min_timed: int = 2) -> dict:
        import pytorch_lightning as pl

        clock = StepClock(self.batch, warmup, seconds, min_timed, _sync(self.spec))

        class Timer(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                clock.step(*_count([batch["query"]["attention_mask"], batch["passages"]["attention_mask"]]))
                if clock.done:
                    trainer.should_stop = True

        self.data.seed = seed
        cuda = self.spec.get("device", "cpu") == "cuda"
        precision = "bf16-mixed" if self.spec.get("precision", "32") == "bf16" else "32-true"
        cfg = dict(accelerator="gpu" if cuda else "cpu", devices=1, precision=precision,
                   max_steps=NOMINAL_STEPS, gradient_clip_val=CLIP,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   use_distributed_sampler=False, default_root_dir=tempfile.mkdtemp())
        trainer = pl.Trainer(**{**cfg, **self.module.trainer_overrides(cfg)}, callbacks=[Timer()])
        trainer.fit(self.module, datamodule=self.data)
        opt = trainer.optimizers[0]
        return {**clock.result(), "optimizer": _optimizer_name(opt)}


class EmbedkitEncoding:
    def __init__(self, spec: dict, texts: list[str], work: Path):
        from embedkit.models.build import load_encoder

        sw = spec["switches"]
        self.encoder = load_encoder(work / "model", device=spec.get("device", "cpu"), unpad=sw["unpad"],
                                    compile=sw["compile"])
        if not sw["unpad"]:
            self.encoder.backbone.config._attn_implementation = sw["attn"]
        self.texts, self.spec = texts, spec
        self.encoder.encode(texts[:spec["batch"]], batch_size=spec["batch"], max_length=spec["max_len"])

    def run(self, seconds: float, warmup: int, seed: int) -> dict:
        return _encode_rate(lambda xs: self.encoder.encode(xs, batch_size=self.spec["batch"],
                                                           max_length=self.spec["max_len"]),
                            self.texts, seconds)


# ---------------------------------------------------------------------- sentence-transformers


class STTraining:
    """SentenceTransformerTrainer with (Cached)MultipleNegativesRankingLoss, its default batches."""

    def __init__(self, spec: dict, pairs: list[dict], work: Path):
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss)

        self.batch, self.spec = spec["batch"], spec
        self.model = SentenceTransformer(str(work / "model"), device=spec.get("device", "cpu"))
        self.model.max_seq_length = spec["max_len"]
        self.dataset = Dataset.from_dict({"anchor": [r["query"] for r in pairs],
                                          "positive": [r["pos"][0] for r in pairs]})
        gc = spec.get("grad_cache")
        scale = 1.0 / TEMPERATURE
        self.loss = (CachedMultipleNegativesRankingLoss(self.model, scale=scale, mini_batch_size=gc)
                     if gc else MultipleNegativesRankingLoss(self.model, scale=scale))

    def run(self, seconds: float, warmup: int, seed: int, min_timed: int = 2) -> dict:
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from transformers import TrainerCallback

        clock = StepClock(self.batch, warmup, seconds, min_timed, _sync(self.spec))
        pending: list[tuple[int, int]] = []

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step(*(pending.pop(0) if pending else (0, 0)))
                if clock.done:
                    control.should_training_stop = True

        args = SentenceTransformerTrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=self.batch,
            max_steps=NOMINAL_STEPS, learning_rate=LR, warmup_steps=WARMUP_RATIO,  # a float: a ratio
            weight_decay=0.0, max_grad_norm=CLIP, logging_steps=NOMINAL_STEPS, save_strategy="no",
            report_to=[], dataloader_drop_last=True, use_cpu=self.spec.get("device", "cpu") == "cpu",
            bf16=self.spec.get("precision", "32") == "bf16", seed=seed, data_seed=seed, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=self.model, args=args, train_dataset=self.dataset,
                                             loss=self.loss, callbacks=[Timer()])
        trainer.data_collator = CountingCollator(trainer.data_collator, pending)
        trainer.train()
        return {**clock.result(), "optimizer": _optimizer_name(trainer.optimizer)}


class CountingCollator:
    """sentence-transformers' collator, noting each batch's (token slots, real tokens)."""

    def __init__(self, inner, sink: list):
        self.inner, self.sink = inner, sink

    def __call__(self, features):
        out = self.inner(features)
        self.sink.append(_count([v for k, v in out.items() if k.endswith("attention_mask")]))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


class STEncoding:
    def __init__(self, spec: dict, texts: list[str], work: Path):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(work / "model"), device=spec.get("device", "cpu"))
        self.model.max_seq_length = spec["max_len"]
        self.texts, self.spec = texts, spec
        self.model.encode(texts[:spec["batch"]], batch_size=spec["batch"], convert_to_numpy=True)

    def run(self, seconds: float, warmup: int, seed: int) -> dict:
        return _encode_rate(lambda xs: self.model.encode(xs, batch_size=self.spec["batch"],
                                                         convert_to_numpy=True),
                            self.texts, seconds)


# ---------------------------------------------------------------------- shared


def _encode_rate(encode, texts: list[str], seconds: float) -> dict:
    """Whole passes over `texts` until `seconds` passed (at least one): texts/s."""
    start, passes = time.perf_counter(), 0
    while True:
        out = encode(texts)
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"samples_per_s": passes * len(texts) / elapsed, "passes": passes, "timed_s": elapsed,
            "dim": int(out.shape[1])}


def _optimizer_name(opt) -> str:
    inner = getattr(opt, "optimizer", opt)   # Lightning's / accelerate's wrappers
    fused = inner.defaults.get("fused") if hasattr(inner, "defaults") else None
    return f"{type(inner).__name__}{' (fused)' if fused else ''}"


SESSIONS = {("embedkit", "train"): EmbedkitTraining, ("embedkit", "encode"): EmbedkitEncoding,
            ("st", "train"): STTraining, ("st", "encode"): STEncoding}


def serve(side: str, work: Path, stdin, stdout) -> None:
    """A worker's loop: one JSON command per line in, one `RESULT {json}` or `ERROR text` line out.

    {"spec": {...}, "seconds": S, "warmup": W, "seed": N} runs one repeat of the session `spec`
    (built on first use: then also `first_warmup` untimed steps, whose first-step time is the
    session's start-up cost, e.g. a torch.compile); {"quit": true} ends the loop."""
    import traceback

    pairs = json.loads((work / "pairs.json").read_text())
    sessions: dict[str, object] = {}
    for line in stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            return
        try:
            spec = cmd["spec"]
            key = json.dumps(spec, sort_keys=True)
            extra = {}
            if key not in sessions:
                t0 = time.perf_counter()
                cls = SESSIONS[(side, spec["kind"])]
                data = pairs if spec["kind"] == "train" else encode_texts(pairs, spec["texts"])
                sessions[key] = session = cls(spec, data, work)
                extra["build_s"] = time.perf_counter() - t0
                if spec["kind"] == "train":
                    # first_warmup steps, none timed: the compile (if any) and every first-time cost
                    start = session.run(0.0, cmd["first_warmup"] - 1, seed=10_000, min_timed=0)
                    extra["startup_first_step_s"] = start["first_step_s"]
                    extra["startup_s"] = time.perf_counter() - t0
            result = sessions[key].run(cmd["seconds"], cmd["warmup"], cmd["seed"])
            stdout.write("RESULT " + json.dumps({**result, **extra}) + "\n")
        except Exception:   # noqa: BLE001  reported to the parent, which stops the bench
            stdout.write("ERROR " + json.dumps(traceback.format_exc()) + "\n")
        stdout.flush()


def encode_texts(pairs: list[dict], n: int) -> list[str]:
    """The first `n` distinct passages and queries of the pairs (mixed lengths, as evaluation sees)."""
    texts = list(dict.fromkeys(t for r in pairs for t in (r["pos"][0], r["query"])))
    return texts[:n]
