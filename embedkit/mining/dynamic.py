"""Dynamic hard-negative mining (DHNM, Conan-Embedding, Li et al. 2024, arXiv:2408.15710 §3.3).

Negatives mined before training stop being hard once the model has learned them. For every sample
the callback keeps s0, the mean score q·n of its hard negatives when they were assigned, and s,
the latest such score. Every `check_every` steps (100 in the paper) a sample is stale when

    ratio · s < s0   and   |s| < max_abs          (ratio 1.15, max_abs 0.8 in the paper)

i.e. its negatives score clearly lower than they did and are not near-duplicates of the query.
Then "a new round of hard negative mining" is run for the stale samples with the current weights:
their queries and the candidate corpus are embedded by the encoder as it is now, the queries are
searched against it (faiss, embedkit/mining/ann.py: inner product of the normalised embeddings,
the query itself and the positives removed), and the i-th replacement takes ranks

    (i−1)·n + offset .. i·n + offset               (offset 10 in the paper)

of that fresh ranking, n = the negatives per sample (`data.train_group_size − 1`), rank 0 first.

s0 and s. s0 is measured when negatives are assigned, with the weights of that moment: at the
start of training for the data's own `neg` (the initial mining), and right after a refresh for
the new window, which resets s0 and clears s. s is read from the training steps' own embeddings
(the objective leaves them in `last_embeddings`), and each check also re-scores the `rescore`
samples (default 32, one mini batch) whose last score is the oldest. Every score is a no-grad
forward in the encoder's training mode, dropout included, because the training steps' scores are,
and the rule compares them; the ranking is taken in eval mode, as the offline miner does.

The corpus a round searches (`corpus`):

- `candidates` (default): the union of the stale samples' candidate pools, re-embedded at each
  round. A sample's pool is its last ranking, `candidate_depth` long: the rows' `candidates`
  (`python -m embedkit.mining ... miner.keep_candidates=K`) or, with `candidates: mine`, a
  ranking of every training passage by the encoder at the start of training; a refresh replaces
  it by the fresh ranking. This is the reading of "the whole process costs about one step": a
  round embeds about (stale samples) × `candidate_depth` passages, forward only, against a
  training step's batch × group passages forward and backward, and never the whole corpus.
- `all`: every training passage, re-embedded at each round that has a stale sample: a literal new
  mining round over the corpus, exact but costing a pass over it each time (no pools needed).

A sample whose fresh ranking is too short for its next window keeps its negatives for the rest of
training (counted in `exhausted`): re-mining it at every later check would cost a round for no
replacement. Samples without negatives (weak pairs, filled with random passages) are not tracked.

Logged: `dhnm/pos_score` and `dhnm/neg_score` per step (batch means, Conan Figure 3's curves),
`dhnm/refreshed` per check and `dhnm/refreshed_total`. `summary()` gives the counts and the score
curves; the recipe writes it beside the model. The state (windows, s0, s, the negatives and pools
the callback wrote, the checks and curves) is saved in checkpoints through `state_dict` /
`load_state_dict` and re-applied to the data when training resumes, so a resumed run neither
re-measures s0 nor re-ranks with the resumed weights.

Single process only, for now: under DDP each rank would keep its own state for the samples it
trains on and refresh only its own copy of the data; the windows are not synchronised across ranks.
For the same reason the data must be loaded in this process (`data.num_workers: 0`): persistent
loader workers hold copies of the negatives that a refresh never reaches.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

CANDIDATE_SOURCES = ("data", "mine")
CORPORA = ("candidates", "all")
_STATE_VERSION = 2


def should_refresh(initial, current, ratio: float = 1.15, max_abs: float = 0.8) -> np.ndarray:
    """Conan's rule, elementwise: ratio·s < s0 and |s| < max_abs; NaN (not yet scored) never fires."""
    initial = np.asarray(initial, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    known = ~np.isnan(initial) & ~np.isnan(current)
    with np.errstate(invalid="ignore"):
        return known & (ratio * current < initial) & (np.abs(current) < max_abs)


def window(ranking, replacement: int, n: int, offset: int = 10) -> list[int] | None:
    """The `replacement`-th window (1-based) of a ranking: ranks (i−1)·n+offset .. i·n+offset,
    or None when the ranking is too short to give all n."""
    lo, hi = (replacement - 1) * n + offset, replacement * n + offset
    return list(ranking[lo:hi]) if len(ranking) >= hi else None


def _ragged(lists) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids as (flat, offsets) tensors: checkpoints are read with weights_only=True."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    flat = np.fromiter((j for x in lists for j in x), dtype=np.int64, count=int(offsets[-1]))
    return torch.from_numpy(flat), torch.from_numpy(offsets)


def _unragged(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    flat, offsets = flat.tolist(), offsets.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


class DynamicHardNegatives(pl.Callback):
    """Conan's DHNM as a callback (see the module docstring). `check_every`, `ratio`, `max_abs` and
    `offset` are the paper's 100, 1.15, 0.8 and 10; `corpus` is what a mining round searches
    (`candidates`: the stale samples' pools, `all`: every training passage); `candidates` where the
    first pools come from (`data`: the rows' `candidates`, `mine`: ranked at the start of training),
    `candidate_depth` a pool's length; `rescore` the samples re-scored per check; `task` the
    retrieval task under multi-task training; `mine_batch_size` the batch of the callback's own
    forwards."""

    def __init__(self, check_every: int = 100, ratio: float = 1.15, max_abs: float = 0.8,
                 offset: int = 10, rescore: int = 32, candidates: str = "data",
                 candidate_depth: int = 60, corpus: str = "candidates", task: str | None = None,
                 mine_batch_size: int = 256):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if candidates not in CANDIDATE_SOURCES:
            raise ValueError(f"candidates must be 'data' (rows carry them) or 'mine', got {candidates!r}")
        if corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA} (what a mining round searches), "
                             f"got {corpus!r}")
        if offset < 0 or candidate_depth < 1 or mine_batch_size < 1:
            raise ValueError(f"offset must be >= 0, candidate_depth and mine_batch_size >= 1; got "
                             f"{offset}, {candidate_depth}, {mine_batch_size}")
        self.check_every = check_every
        self.ratio = ratio
        self.max_abs = max_abs
        self.offset = offset
        self.rescore = rescore
        self.candidates = candidates
        self.candidate_depth = candidate_depth
        self.corpus = corpus
        self.task = task
        self.mine_batch_size = mine_batch_size
        self.window_index = np.zeros(0, dtype=np.int64)   # replacements done per sample
        self.initial = np.zeros(0)
        self.current = np.zeros(0)
        self.seen_at = np.zeros(0, dtype=np.int64)
        self.spent = np.zeros(0, dtype=bool)              # ranking ran out: negatives kept for good
        self.owns_candidates = np.zeros(0, dtype=bool)    # pools this callback wrote (checkpointed)
        self.started = False                              # s0 assigned (and pools ranked)
        self.refreshed_total = 0
        self.exhausted = 0
        self.checks: list[dict] = []
        self.curve: list[tuple[int, float, float]] = []
        self.dataset = None
        self.encoder = None
        self.pad_id = 0
        self.examples = None
        self.passage_texts = None
        self._restored: dict | None = None

    # ------------------------------------------------------------------ state

    def reset(self, size: int) -> None:
        self.window_index = np.zeros(size, dtype=np.int64)
        self.initial = np.full(size, np.nan)
        self.current = np.full(size, np.nan)
        self.seen_at = np.full(size, -1, dtype=np.int64)
        self.spent = np.zeros(size, dtype=bool)
        self.owns_candidates = np.zeros(size, dtype=bool)

    def state_dict(self) -> dict:
        if self._restored is not None:   # restored, not attached yet: hand the same state on
            neg_of, cand_of = sorted(self._restored["neg"]), sorted(self._restored["candidates"])
            negs = [self._restored["neg"][i] for i in neg_of]
            cands = [self._restored["candidates"][i] for i in cand_of]
        else:
            ds = self.dataset
            neg_of = np.flatnonzero(self.window_index > 0)
            cand_of = np.flatnonzero(self.owns_candidates)
            negs = [ds.neg[i] for i in neg_of] if ds is not None else []
            cands = [ds.candidates[i] for i in cand_of] if ds is not None else []
        neg, cand = _ragged(negs), _ragged(cands)
        checks = [[c["step"], c["fired"], c["refreshed"], c["exhausted"], c["rescored"], c["pool"]]
                  for c in self.checks]
        return {"version": _STATE_VERSION, "started": self.started,
                "window_index": torch.from_numpy(self.window_index.copy()),
                "initial": torch.from_numpy(self.initial.copy()),
                "current": torch.from_numpy(self.current.copy()),
                "seen_at": torch.from_numpy(self.seen_at.copy()),
                "spent": torch.from_numpy(self.spent.copy()),
                "neg_of": torch.tensor(neg_of, dtype=torch.int64), "neg_flat": neg[0],
                "neg_offsets": neg[1], "candidates_of": torch.tensor(cand_of, dtype=torch.int64),
                "candidates_flat": cand[0],
                "candidates_offsets": cand[1],
                "checks": torch.tensor(checks, dtype=torch.int64).reshape(-1, 6),
                "curve": torch.tensor(self.curve, dtype=torch.float64).reshape(-1, 3),
                "refreshed_total": self.refreshed_total, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"this checkpoint's DHNM state is version {state.get('version', 1)}, "
                             f"this code reads version {_STATE_VERSION} (s0 measured at assignment, "
                             f"pools re-mined each round): restart the stage instead of resuming it")
        self.window_index = state["window_index"].numpy().astype(np.int64)
        self.initial = state["initial"].numpy().astype(np.float64)
        self.current = state["current"].numpy().astype(np.float64)
        self.seen_at = state["seen_at"].numpy().astype(np.int64)
        self.spent = state["spent"].numpy().astype(bool)
        self.owns_candidates = np.zeros(len(self.window_index), dtype=bool)
        self.started = bool(state["started"])
        self.refreshed_total = int(state["refreshed_total"])
        self.exhausted = int(state["exhausted"])
        self.checks = [dict(zip(("step", "fired", "refreshed", "exhausted", "rescored", "pool"), row))
                       for row in state["checks"].tolist()]
        self.curve = [(int(s), p, n) for s, p, n in state["curve"].tolist()]
        self._restored = {
            "neg": dict(zip(state["neg_of"].tolist(),
                            _unragged(state["neg_flat"], state["neg_offsets"]))),
            "candidates": dict(zip(state["candidates_of"].tolist(),
                                   _unragged(state["candidates_flat"], state["candidates_offsets"])))}
        if self.dataset is not None:
            self._apply_restored(self.dataset)

    def _apply_restored(self, dataset) -> None:
        """Put the negatives and pools of the checkpoint into the data (a resumed run)."""
        restored, self._restored = self._restored, None
        top = max((j for ids in (*restored["neg"].values(), *restored["candidates"].values())
                   for j in ids), default=-1)
        if top >= len(dataset.passages):
            raise ValueError(f"the restored DHNM state names passage {top}, the data has "
                             f"{len(dataset.passages)}: resume with the same training data")
        for i, ids in restored["neg"].items():
            dataset.neg[i] = ids
        for i, ids in restored["candidates"].items():
            dataset.candidates[i] = ids
            self.owns_candidates[i] = True

    # ------------------------------------------------------------------ data

    def _datamodule(self, trainer):
        dm = trainer.datamodule
        if self.task is not None:
            dm = dm.tasks[self.task]
        return dm

    def negatives_per_sample(self, dataset) -> int:
        return dataset.group_size - 1

    def attach(self, dataset, encoder=None, pad_id: int = 0, examples=None,
               passage_texts=None) -> None:
        """Bind to a GroupDataset, the encoder and pad id that scoring and mining use, and the
        texts (rows with `query`/`pos`, the passage table's texts) a mining round filters with."""
        if dataset.group_size < 2:
            raise ValueError("dynamic hard-negative mining needs hard negatives: set "
                             "data.train_group_size >= 2")
        if examples is not None and len(examples) != len(dataset):
            raise ValueError(f"{len(examples)} example rows for {len(dataset)} samples")
        if passage_texts is not None and len(passage_texts) != len(dataset.passages):
            raise ValueError(f"{len(passage_texts)} passage texts for {len(dataset.passages)} passages")
        self.dataset = dataset
        self.encoder = encoder
        self.pad_id = pad_id
        self.examples = examples
        self.passage_texts = passage_texts
        if len(self.window_index) != len(dataset):
            if len(self.window_index):
                raise ValueError(f"the restored DHNM state holds {len(self.window_index)} samples, the "
                                 f"data {len(dataset)}: resume with the same training data")
            self.reset(len(dataset))
        if self._restored is not None:
            self._apply_restored(dataset)

    def on_train_start(self, trainer, pl_module) -> None:
        dm = self._datamodule(trainer)
        if getattr(dm, "num_workers", 0):
            raise ValueError(f"DHNM replaces negatives in the training process; data.num_workers="
                             f"{dm.num_workers} keeps copies in loader workers that never see them: "
                             "set the retrieval data's num_workers to 0")
        self.attach(dm.dataset, encoder=pl_module.encoder, pad_id=dm.tokenizer.pad_token_id,
                    examples=dm.examples, passage_texts=dm.passage_texts)
        if not self.started:   # a resumed run has its s0 and pools in the restored state
            self.start(int(trainer.global_step))

    def start(self, step: int = 0) -> None:
        """Before the first step: the candidate pools (`corpus: candidates`) and every s0."""
        ds = self.dataset
        if self.corpus == "candidates":
            if self.candidates == "mine":
                self.rank_candidates()
            elif not any(ds.candidates):
                raise ValueError("DHNM with candidates=data needs rows with `candidates` (mine them "
                                 "with `python -m embedkit.mining miner.keep_candidates=60`), or "
                                 "candidates=mine, or corpus=all")
        self.assign_initial(step)
        self.started = True

    # ------------------------------------------------------------------ embedding and scoring

    def _device(self):
        if self.encoder is None:
            raise RuntimeError("DHNM scores and mines with the encoder: attach(dataset, encoder=...)")
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def _embed(self, table, ids, train: bool) -> torch.Tensor:
        """Rows `ids` of a token table, embedded in length-sorted batches (less padding), in input
        order; in the encoder's training mode (`train`) or in eval mode."""
        from embedkit.data.batching import pad_rows

        encoder, device = self.encoder, self._device()
        ids = np.asarray(ids, dtype=np.int64)
        lengths = table.lengths()[ids]
        order = np.argsort(-lengths, kind="stable")
        out = None
        was_training = encoder.training
        encoder.train(train and was_training)
        try:
            for s in range(0, len(ids), self.mine_batch_size):
                chunk = order[s:s + self.mine_batch_size]
                tok = pad_rows([table.row(int(ids[k])) for k in chunk], self.pad_id)
                emb = encoder(tok["input_ids"].to(device), tok["attention_mask"].to(device))
                if out is None:
                    out = torch.empty((len(ids), emb.shape[-1]), dtype=torch.float32)
                out[torch.from_numpy(chunk)] = emb.float().cpu()
        finally:
            encoder.train(was_training)
        return out if out is not None else torch.zeros((0, 0))

    def score(self, samples, negatives) -> np.ndarray:
        """Mean q·n of each sample's query over its `negatives` (lists of passage ids), in the
        encoder's training mode like the training steps' scores it is compared with."""
        samples = np.asarray(samples, dtype=np.int64)
        flat = [j for neg in negatives for j in neg]
        if not len(samples) or not flat:
            return np.full(len(samples), np.nan)
        ds = self.dataset
        q = self._embed(ds.queries, samples, train=True)
        p = self._embed(ds.passages, flat, train=True)
        owner = torch.repeat_interleave(torch.arange(len(samples)),
                                        torch.tensor([len(neg) for neg in negatives]))
        dots = (q[owner] * p).sum(-1).double()
        sums = torch.zeros(len(samples), dtype=torch.float64).index_add_(0, owner, dots)
        counts = torch.bincount(owner, minlength=len(samples)).double()
        return (sums / counts).numpy()   # 0/0: NaN for a sample without negatives (never fires)

    def assign_initial(self, step: int) -> None:
        """s0 of the data's own negatives with the weights training starts from; one forward of
        every query and its negatives, once."""
        ds = self.dataset
        tracked = np.array([i for i in range(len(ds)) if ds.neg[i]], dtype=np.int64)
        self.initial[:] = np.nan
        self.initial[tracked] = self.score(tracked, [ds.neg[i] for i in tracked])
        self.current[:] = np.nan
        self.seen_at[:] = step
        log.info("DHNM: s0 of %d samples' negatives with the starting weights (mean %.4f)",
                 len(tracked), float(np.nanmean(self.initial)) if len(tracked) else float("nan"))

    def rankings(self, samples, pool, depth: int) -> list[list[int]]:
        """One mining round: each sample's query searched against the passages `pool` (ids), both
        embedded now (eval mode); the clean ranking (query and positives removed), `depth` long."""
        from embedkit.mining.ann import mine_from_embeddings

        if self.examples is None or self.passage_texts is None:
            raise RuntimeError("a DHNM mining round needs the texts: attach(..., examples=dm.examples, "
                               "passage_texts=dm.passage_texts)")
        ds = self.dataset
        samples, pool = np.asarray(samples, dtype=np.int64), np.asarray(pool, dtype=np.int64)
        q = self._embed(ds.queries, samples, train=False).numpy()
        p = self._embed(ds.passages, pool, train=False).numpy()
        rows = [{"query": self.examples[i]["query"], "pos": self.examples[i]["pos"]} for i in samples]
        texts = [self.passage_texts[j] for j in pool]
        mined, _ = mine_from_embeddings(rows, q, texts, p, range_for_sampling=f"0-{depth}",
                                        negative_number=0, keep_candidates=depth, use_gpu="auto")
        index = {t: int(j) for t, j in zip(texts, pool)}
        return [[index[c] for c in r["candidates"]] for r in mined]

    def rank_candidates(self) -> None:
        """`candidates: mine`: every sample's pool ranked over all training passages by the
        encoder training starts from."""
        ds = self.dataset
        every = np.arange(len(ds))
        ds.candidates = self.rankings(every, np.arange(len(ds.passages)), self.candidate_depth)
        self.owns_candidates[:] = True
        log.info("DHNM: ranked %d candidates for each of %d samples with the initial encoder",
                 self.candidate_depth, len(ds))

    # ------------------------------------------------------------------ tracking and checks

    def observe(self, indices, neg_scores, step: int) -> None:
        """Record one step's mean negative score per sample (s; s0 is set at assignment)."""
        indices = np.asarray(indices)
        self.current[indices] = np.asarray(neg_scores, dtype=np.float64)
        self.seen_at[indices] = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        self.track(pl_module, batch, step)
        # Checks run on the step count whatever task the step trained (sequential training).
        if step > 0 and step % self.check_every == 0:
            refreshed = self.check(step, epoch=int(trainer.current_epoch))
            pl_module.log("dhnm/refreshed", float(refreshed), on_step=True, on_epoch=False)
            pl_module.log("dhnm/refreshed_total", float(self.refreshed_total), on_step=True,
                          on_epoch=False)

    def track(self, pl_module, batch, step: int) -> None:
        """Record this step's scores of the samples it trained on (none if it trained another task)."""
        emb = getattr(pl_module, "last_embeddings", None)
        if self.task is not None:
            batch, emb = batch.get(self.task), (emb or {}).get(self.task)
        if batch is None or emb is None:
            return   # sequential multi-task training: this step trained another task
        if "index" not in batch:
            raise KeyError("DHNM needs the example indices in the batch (ContrastiveDataModule adds "
                           "`index`)")
        q, p = emb["query"].detach().float(), emb["passages"].detach().float()
        g = p.shape[0] // q.shape[0]
        groups = p.view(q.shape[0], g, -1)
        pos = (q * groups[:, 0]).sum(-1)
        neg = (q.unsqueeze(1) * groups[:, 1:]).sum(-1).mean(1)
        self.observe(batch["index"].cpu().numpy(), neg.cpu().numpy(), step)
        self.curve.append((step, float(pos.mean()), float(neg.mean())))
        pl_module.log("dhnm/pos_score", pos.mean(), on_step=True, on_epoch=False, batch_size=q.shape[0])
        pl_module.log("dhnm/neg_score", neg.mean(), on_step=True, on_epoch=False, batch_size=q.shape[0])

    def rescore_stale(self, step: int, epoch: int) -> int:
        """Score the `rescore` samples whose last score is oldest (s0 known), with this epoch's
        negatives; one no-grad forward of a batch."""
        if not self.rescore or self.encoder is None:
            return 0
        ds = self.dataset
        eligible = np.flatnonzero(~np.isnan(self.initial) & ~self.spent & (self.seen_at < step))
        if not len(eligible):
            return 0
        chosen = eligible[np.argsort(self.seen_at[eligible], kind="stable")[:self.rescore]]
        self.observe(chosen, self.score(chosen, [ds.group(int(i), epoch)[1:] for i in chosen]), step)
        return len(chosen)

    def check(self, step: int, epoch: int = 0) -> int:
        """Re-score the stalest samples, then run a mining round for every sample the rule fires for."""
        rescored = self.rescore_stale(step, epoch)
        fire = np.flatnonzero(should_refresh(self.initial, self.current, self.ratio, self.max_abs)
                              & ~self.spent)
        refreshed, exhausted, pool = self.refresh(fire, step) if len(fire) else (0, 0, 0)
        self.checks.append({"step": step, "fired": int(len(fire)), "refreshed": refreshed,
                            "exhausted": exhausted, "rescored": rescored, "pool": pool})
        return refreshed

    def refresh(self, samples, step: int) -> tuple[int, int, int]:
        """A new mining round for `samples` with the current weights: the next window of each fresh
        ranking becomes its negatives, the ranking its pool, and their score its s0.
        Returns (refreshed, exhausted, passages embedded)."""
        started = time.perf_counter()
        ds, n = self.dataset, self.negatives_per_sample(self.dataset)
        samples = np.asarray(samples, dtype=np.int64)
        if self.corpus == "all":
            pool = np.arange(len(ds.passages))
        else:
            pool = np.unique(np.fromiter((j for i in samples for j in ds.candidates[i]), dtype=np.int64))
        new = {}
        if len(pool):
            # Deep enough for the furthest window asked for, and never shallower than the pool depth.
            depth = max(self.candidate_depth, int(self.window_index[samples].max() + 1) * n + self.offset)
            for i, ranking in zip(samples, self.rankings(samples, pool, depth)):
                ids = window(ranking, int(self.window_index[i]) + 1, n, self.offset)
                if ids is not None:
                    new[int(i)] = (ids, ranking)
        for i in samples:
            if int(i) not in new:
                self.spent[i] = True
        done = np.array(sorted(new), dtype=np.int64)
        for i in done:
            ds.neg[i], ds.candidates[i] = new[int(i)]
            self.owns_candidates[i] = True
            self.window_index[i] += 1
        self.initial[done] = self.score(done, [ds.neg[i] for i in done])
        self.current[done] = np.nan
        self.seen_at[done] = step
        exhausted = len(samples) - len(done)
        self.refreshed_total += len(done)
        self.exhausted += exhausted
        log.info("DHNM round at step %d: %d samples refreshed (%d out of candidates) over %d "
                 "passages in %.2fs", step, len(done), exhausted, len(pool),
                 time.perf_counter() - started)
        return len(done), exhausted, int(len(pool))

    def summary(self) -> dict:
        return {"refreshed_total": self.refreshed_total, "exhausted": self.exhausted,
                "corpus": self.corpus, "samples": int(len(self.window_index)),
                "samples_refreshed": int((self.window_index > 0).sum()),
                "max_replacements": int(self.window_index.max()) if len(self.window_index) else 0,
                "checks": self.checks,
                "curve": [{"step": s, "pos_score": p, "neg_score": n} for s, p, n in self.curve]}
