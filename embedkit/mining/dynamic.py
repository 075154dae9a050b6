"""Dynamic hard-negative mining (DHNM, Conan-Embedding, Li et al. 2024, arXiv:2408.15710 §3.3).

Negatives mined before training stop being hard once the model has learned them. For every sample
the callback keeps s0, the mean score q·n over its current hard negatives when it first sees them,
and s, the latest such score. Every `check_every` steps (100 in the paper) a sample is refreshed when

    ratio · s < s0   and   |s| < max_abs          (ratio 1.15, max_abs 0.8 in the paper)

i.e. its negatives score clearly lower than they did and are not near-duplicates of the query. The
i-th replacement takes ranks (i−1)·n + offset .. i·n + offset (offset 10, n = the number of negatives
per sample, `data.train_group_size − 1`) of the sample's precomputed candidate ranking: the clean
ranking from the ANN miner (embedkit/mining/ann.py, query and positives removed, rank 0 first).

Cost. s0 and s are read from the training step's own embeddings (the objective leaves them in
`last_embeddings`), so tracking needs no extra forward pass. Each check also re-scores up to
`rescore` samples (default 32, one mini batch) whose last score is the oldest, with one no-grad
forward of their queries and this epoch's negatives, in training mode like the scores it is
compared with: less than one training step (no backward),
which is the cost the paper states ("the cost of one step"). Rankings are precomputed: carried by
the data (`candidates` from `python -m embedkit.mining ... miner.keep_candidates=K`) or, with
`candidates: mine`, ranked once at the start of training by the encoder being trained (its
initial weights: the "current model" when training starts) over the training passages.

Logged: `dhnm/pos_score` and `dhnm/neg_score` per step (batch means, Conan Figure 3's curves),
`dhnm/refreshed` per check and `dhnm/refreshed_total`. `summary()` gives the counts and the score
curves; the recipe writes it beside the model. The state (windows, s0, s, counts) is saved in
checkpoints through `state_dict` / `load_state_dict` and re-applied to the data when training
resumes.

Single process only, for now: under DDP each rank would keep its own state for the samples it
trains on and refresh only its own copy of the data; the windows are not synchronised across ranks.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch

from embedkit.data.instructions import instructed_query

log = logging.getLogger(__name__)


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


class DynamicHardNegatives(pl.Callback):
    def __init__(self, check_every: int = 100, ratio: float = 1.15, max_abs: float = 0.8,
                 offset: int = 10, rescore: int = 32, candidates: str = "data",
                 candidate_depth: int = 60, task: str | None = None, mine_batch_size: int = 256):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if candidates not in ("data", "mine"):
            raise ValueError(f"candidates must be 'data' (rows carry them) or 'mine', got {candidates!r}")
        self.check_every = check_every
        self.ratio = ratio
        self.max_abs = max_abs
        self.offset = offset
        self.rescore = rescore
        self.candidates = candidates
        self.candidate_depth = candidate_depth
        self.task = task
        self.mine_batch_size = mine_batch_size
        self.window_index = np.zeros(0, dtype=np.int64)   # replacements done per sample
        self.initial = np.zeros(0)
        self.current = np.zeros(0)
        self.seen_at = np.zeros(0, dtype=np.int64)
        self.refreshed_total = 0
        self.exhausted = 0
        self.checks: list[dict] = []
        self.curve: list[tuple[int, float, float]] = []
        self.dataset = None
        self.encoder = None
        self.pad_id = 0

    # ------------------------------------------------------------------ state

    def reset(self, size: int) -> None:
        self.window_index = np.zeros(size, dtype=np.int64)
        self.initial = np.full(size, np.nan)
        self.current = np.full(size, np.nan)
        self.seen_at = np.full(size, -1, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"window_index": torch.from_numpy(self.window_index.copy()),
                "initial": torch.from_numpy(self.initial.copy()),
                "current": torch.from_numpy(self.current.copy()),
                "seen_at": torch.from_numpy(self.seen_at.copy()),
                "refreshed_total": self.refreshed_total, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict) -> None:
        self.window_index = state["window_index"].numpy().astype(np.int64)
        self.initial = state["initial"].numpy().astype(np.float64)
        self.current = state["current"].numpy().astype(np.float64)
        self.seen_at = state["seen_at"].numpy().astype(np.int64)
        self.refreshed_total = int(state["refreshed_total"])
        self.exhausted = int(state["exhausted"])
        if self.dataset is not None:
            self.apply_windows(self.dataset)

    # ------------------------------------------------------------------ data

    def _datamodule(self, trainer):
        dm = trainer.datamodule
        if self.task is not None:
            dm = dm.tasks[self.task]
        return dm

    def negatives_per_sample(self, dataset) -> int:
        return dataset.group_size - 1

    def apply_windows(self, dataset) -> None:
        """Put every sample's current window into the data (after a restore)."""
        n = self.negatives_per_sample(dataset)
        for i in np.flatnonzero(self.window_index):
            ids = window(dataset.candidates[i], int(self.window_index[i]), n, self.offset)
            if ids is not None:
                dataset.neg[i] = ids

    def attach(self, dataset, encoder=None, pad_id: int = 0) -> None:
        """Bind to a GroupDataset (and the encoder and pad id that re-scoring uses)."""
        if dataset.group_size < 2:
            raise ValueError("dynamic hard-negative mining needs hard negatives: set "
                             "data.train_group_size >= 2")
        self.dataset = dataset
        self.encoder = encoder
        self.pad_id = pad_id
        if len(self.window_index) != len(dataset):
            if len(self.window_index):
                raise ValueError(f"the restored DHNM state holds {len(self.window_index)} samples, the "
                                 f"data {len(dataset)}: resume with the same training data")
            self.reset(len(dataset))
        self.apply_windows(dataset)

    def rank_candidates(self, dm, encoder) -> None:
        """`candidates: mine`: the clean ranking of every example by the encoder being trained."""
        from embedkit.mining.ann import mine_from_embeddings

        ds, texts = dm.dataset, dm.passage_texts
        q = encoder.encode([instructed_query(ex, dm.query_instruction) for ex in dm.examples],
                           batch_size=self.mine_batch_size, max_length=dm.query_max_len)
        p = encoder.encode(texts, batch_size=self.mine_batch_size, max_length=dm.passage_max_len)
        rows = [{"query": ex["query"], "pos": ex["pos"]} for ex in dm.examples]
        mined, _ = mine_from_embeddings(rows, q, texts, p, range_for_sampling=f"0-{self.candidate_depth}",
                                        negative_number=0, keep_candidates=self.candidate_depth,
                                        use_gpu="auto")
        index = {t: i for i, t in enumerate(texts)}
        ds.candidates = [[index[c] for c in r["candidates"]] for r in mined]
        log.info("DHNM: ranked %d candidates for each of %d samples with the initial encoder",
                 self.candidate_depth, len(rows))

    def on_train_start(self, trainer, pl_module) -> None:
        dm = self._datamodule(trainer)
        if self.candidates == "mine":
            self.rank_candidates(dm, pl_module.encoder)
        elif not any(dm.dataset.candidates):
            raise ValueError("DHNM with candidates=data needs rows with `candidates` (mine them with "
                             "`python -m embedkit.mining miner.keep_candidates=60`), or candidates=mine")
        self.attach(dm.dataset, encoder=pl_module.encoder, pad_id=dm.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ tracking and checks

    def observe(self, indices, neg_scores, step: int) -> None:
        """Record one step's mean negative score per sample: the first is s0, later ones s."""
        for i, s in zip(np.asarray(indices), np.asarray(neg_scores, dtype=np.float64)):
            if np.isnan(self.initial[i]):
                self.initial[i] = s
            else:
                self.current[i] = s
            self.seen_at[i] = step

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

    @torch.no_grad()
    def rescore_stale(self, step: int, epoch: int) -> int:
        """Score the `rescore` samples whose last score is oldest (s0 known), with this epoch's
        negatives; one no-grad forward of a batch."""
        if not self.rescore or self.encoder is None:
            return 0
        from embedkit.data.batching import pad_rows

        ds = self.dataset
        eligible = np.flatnonzero(~np.isnan(self.initial) & (self.seen_at < step))
        if not len(eligible):
            return 0
        chosen = eligible[np.argsort(self.seen_at[eligible], kind="stable")[:self.rescore]]
        groups = [ds.group(int(i), epoch)[1:] for i in chosen]
        q_tok = pad_rows([ds.queries.row(int(i)) for i in chosen], self.pad_id)
        p_tok = pad_rows([ds.passages.row(j) for g in groups for j in g], self.pad_id)
        # Scored in the encoder's current (training) mode, dropout included: s0 and the other
        # scores come from training steps, and s must be comparable with them.
        encoder = self.encoder
        device = next(encoder.parameters()).device
        q = encoder(q_tok["input_ids"].to(device), q_tok["attention_mask"].to(device)).float()
        p = encoder(p_tok["input_ids"].to(device), p_tok["attention_mask"].to(device)).float()
        n = len(groups[0])
        scores = (q.unsqueeze(1) * p.view(len(chosen), n, -1)).sum(-1).mean(1).cpu().numpy()
        self.observe(chosen, scores, step)
        return len(chosen)

    def check(self, step: int, epoch: int = 0) -> int:
        """Re-score the stalest samples, then refresh every sample the rule fires for."""
        rescored = self.rescore_stale(step, epoch)
        fire = np.flatnonzero(should_refresh(self.initial, self.current, self.ratio, self.max_abs))
        n = self.negatives_per_sample(self.dataset)
        refreshed = exhausted = 0
        for i in fire:
            ids = window(self.dataset.candidates[i], int(self.window_index[i]) + 1, n, self.offset)
            if ids is None:
                exhausted += 1
                continue
            self.window_index[i] += 1
            self.dataset.neg[i] = ids
            self.initial[i] = self.current[i] = np.nan   # the new negatives' s0 is their first score
            refreshed += 1
        self.refreshed_total += refreshed
        self.exhausted += exhausted
        self.checks.append({"step": step, "fired": int(len(fire)), "refreshed": refreshed,
                            "exhausted": exhausted, "rescored": rescored})
        log.info("DHNM check at step %d: %d samples refreshed (%d out of candidates), %d re-scored",
                 step, refreshed, exhausted, rescored)
        return refreshed

    def summary(self) -> dict:
        return {"refreshed_total": self.refreshed_total, "exhausted": self.exhausted,
                "samples": int(len(self.window_index)),
                "samples_refreshed": int((self.window_index > 0).sum()),
                "max_replacements": int(self.window_index.max()) if len(self.window_index) else 0,
                "checks": self.checks,
                "curve": [{"step": s, "pos_score": p, "neg_score": n} for s, p, n in self.curve]}
