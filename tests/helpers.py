"""Helpers shared by the test modules (imported as `from helpers import ...`; no test module imports
another). Fixtures live in conftest.py; numerical tolerances in _numerics.py.

- `compose` / `resolve`: a conf/ config as `python run.py overrides` composes it, and its body resolved.
- `run_py`: `python run.py args` in a subprocess, logs and cache under tmp_path, W&B offline.
- `fake_recipe_rows`: the recipe with its rows, data and suite faked, for resume tests of run().
- `tiny_encoder`: the 32-wide, 1-layer tiny_zh encoder the model tests build, seeded.
- `QUERIES`, `PASSAGES`, `tokens`, `toy_encoder`, `pair_batch`, `sts_batch`: the toy batches of
  the GradCache, DDP and trainer tests, which compare the same computation two ways, and
  `plain_loss_and_grads` / `cached_loss_and_grads` / `assert_same_grads` to compare them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EMBEDKIT_DATA_DIR", REPO.parent / "shared" / "data" / "zh-mini"))


# ---------------------------------------------------------------- configs

def compose(overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False):
    """conf/<config_name>.yaml composed with `overrides` (Hydra's compose API, a fresh GlobalHydra).
    With `return_hydra_config`, the `hydra` node too (its launcher, sweeper, run folders)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from embedkit.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def resolve(cfg, output_dir: str = "/tmp/embedkit-compose") -> dict:
    """Everything but the `hydra` node of a config composed with `return_hydra_config=True`,
    resolved. `${hydra:runtime.output_dir}` is only set inside a Hydra app; it gets `output_dir`."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(cfg)
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(body, resolve=True)


def run_py(args: Sequence[str], tmp_path: Path, timeout: int = 240):
    """`python run.py args paths.log_dir=tmp_path/logs` from the repo, the cache under tmp_path and
    W&B offline without a key; asserts it exits 0 (showing the output's tail) and returns it."""
    import subprocess
    import sys

    env = dict(os.environ, EMBEDKIT_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "run.py", *args, f"paths.log_dir={tmp_path}/logs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def fake_recipe_rows(monkeypatch, recipe, rows: list[dict], run_row) -> None:
    """`recipe.run` with `rows` as its ablation rows and `run_row` training each; no data is read
    (one text, one data key) and the eval suite is a stub named "fake"."""
    monkeypatch.setattr(recipe, "run_row", run_row)
    monkeypatch.setattr(recipe, "ablation_rows", lambda cfg: rows)
    monkeypatch.setattr(recipe.Examples, "get", lambda self, data_cfg: ([], ["字"]))
    monkeypatch.setattr(recipe.Examples, "key", lambda self, data_cfg: "rows")
    monkeypatch.setattr(recipe, "instantiate", lambda node, **kw: type("Suite", (), {"name": "fake"})())


# ---------------------------------------------------------------- models

def tiny_encoder(tokenizer, seed: int = 0, **kwargs):
    """A fresh tiny_zh encoder, 32 wide with 1 layer of 2 heads, after `torch.manual_seed(seed)`;
    `kwargs` go to `tiny_zh_encoder` (pooling, dropout, max_length, projection_dim, ...)."""
    import torch

    from embedkit.models.build import tiny_zh_encoder

    torch.manual_seed(seed)
    return tiny_zh_encoder(tokenizer, **{"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                         "intermediate_size": 64, **kwargs})


# ---------------------------------------------------------------- the GradCache / DDP toy batch

QUERIES = ["北京是中国的首都吗", "上海在哪里", "长江有多长", "今天天气怎么样", "熊猫吃什么", "茶叶产自哪里"]
PASSAGES = ["北京是中华人民共和国的首都", "上海在长江口", "长江全长六千多公里", "今天晴转多云",
            "大熊猫主要吃竹子", "中国南方多产茶叶", "黄河是中国第二长河", "故宫在北京",
            "上海是国际大都市", "熊猫生活在四川", "天气预报说明天下雨", "绿茶和红茶都很有名"]


def toy_encoder(tok, dropout: float = 0.0, seed: int = 0):
    """The mean-pooled tiny encoder of the GradCache and DDP comparisons."""
    return tiny_encoder(tok, seed, max_length=64, dropout=dropout, pooling="mean")


def tokens(tok, texts: Sequence[str]) -> dict:
    """`texts` tokenised and padded: {input_ids, attention_mask}."""
    t = tok(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}


def pair_batch(tok, n_queries=6, group=2):
    return {"query": tokens(tok, QUERIES[:n_queries]),
            "passages": tokens(tok, PASSAGES[:n_queries * group])}


def sts_batch(tok):
    import torch

    return {"sentence1": tokens(tok, QUERIES), "sentence2": tokens(tok, PASSAGES[:6]),
            "labels": torch.tensor([5.0, 4.0, 1.0, 3.0, 0.0, 2.0])}


def plain_loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.loss_from_embeddings(module.embed(batch), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def cached_loss_and_grads(module, batch, mini_batch):
    import torch

    from embedkit.objectives.gradcache import GradCache

    module.zero_grad(set_to_none=True)
    gc = GradCache(mini_batch=mini_batch)
    loss, _, leaves, chunks = gc.loss_and_cache(module, batch)
    keys = list(leaves)
    grads = dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)))
    gc.replay(module, batch, chunks, grads, backward=lambda s: s.backward())
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(actual, expected):
    """Parameter gradients equal to float64 rounding, relative to the largest of them: some are
    ~0 by cancellation (the attention key bias, by softmax invariance) and carry only noise."""
    from _numerics import RTOL64, assert_close_scaled, scale_of

    assert set(actual) == set(expected) and len(expected) > 4
    scale = scale_of(expected)
    for n, g in expected.items():
        assert_close_scaled(actual[n], g, RTOL64, scale=scale, what=n)


# ---------------------------------------------------------------- finished run folders (report tests)

def scores(**kw):
    """Every C-MTEB column at 30, except those given."""
    from embedkit.reporting.tables import COLUMNS

    base = {c: 30.0 for c in COLUMNS}
    base.update(kw)
    return base


def write_run(folder: Path, rows: dict[str, dict], overrides=("+experiment=x",), stages=None,
              config=None, paper_rows=None, single=False):
    """A finished run folder as embedkit/recipes/train_eval.py leaves it (table.*, rows/*/results.json,
    .hydra/config.yaml and overrides.yaml)."""
    import yaml

    from embedkit.reporting.tables import COLUMNS, write_table
    from embedkit.runs import safe_label

    table = [{"label": label, **scores} for label, scores in rows.items()]
    for label, scores in rows.items():
        base = label.split(" ")[0] if stages is None else label
        # one-row runs (mrl_dims: one model, a variant per width) keep results.json at the root
        row_dir = folder if single else folder / "rows" / safe_label(base)
        row_dir.mkdir(parents=True, exist_ok=True)
        if not (row_dir / "results.json").exists():
            (row_dir / "results.json").write_text(json.dumps({
                "label": base, "categories": {c: scores[c] for c in COLUMNS[:-1]}, "Avg": scores["Avg"],
                "scale": "mini", "steps": 70, "stage_steps": stages or {"train": 70}, "train_seconds": 12.5,
                "paper_row": (paper_rows or {}).get(label)}))
    write_table(table, folder, first="row")
    (folder / ".hydra").mkdir(exist_ok=True)
    cfg = {"scale": {"name": "mini"},
           "model": {"name": "tiny_zh", "encoder": {"hidden_size": 128, "num_layers": 2, "pooling": "mean"}},
           "trainer": {"max_steps": -1}, "eval": {"_target_": "embedkit.eval.suite.MiniCMTEB", "max_rows": None},
           "data": {"sources": [{"_target_": "embedkit.data.sources.people_daily_pairs"}],
                    "batch_size": 32, "max_examples": None}}
    cfg.update(config or {})
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return folder


# ---------------------------------------------------------------- the paper path on local stand-ins

#: conf/scale/paper.yaml `corpora`: folder under EMBEDKIT_PAPER_DATA_DIR -> the zh-mini train files
#: whose rows stand in for it (two files where the stage batches one file per global batch).
PAPER_STANDINS = {
    "c-mtp": ["nli_triplets.jsonl"],
    "c-mtp-labeled": ["nli_triplets.jsonl", "stsb_hardneg.jsonl"],
    "bge-m3-finetune": ["nli_triplets.jsonl", "stsb_hardneg.jsonl"],
    "conan-pretrain": ["nli_triplets.jsonl"],
    "conan-retrieval": ["stsb_hardneg.jsonl"],
    "conan-sts": ["stsb_pairs.jsonl"],
}


def _jsonl_rows(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_paper_standins(root: Path, rows_per_file: int = 48, negatives: int = 8) -> Path:
    """Small files in the paper corpora's formats under `root` (EMBEDKIT_PAPER_DATA_DIR), written
    from the first rows of zh-mini's train/ files (read in place, never copied whole):
    wudao/*.jsonl `{"content"}`, FlagEmbedding `{"query", "pos", "neg"}` jsonl for C-MTP, C-MTP
    labeled, BGE-M3's and Conan's retrieval data (negatives padded to `negatives` from other rows,
    so every group size the paper configs ask for can be filled), `{"sentence1", "sentence2",
    "score"}` for Conan's STS."""
    root = Path(root)
    for folder, files in PAPER_STANDINS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in files:
            rows = _jsonl_rows(DATA / "train" / name, rows_per_file)
            if "query" in rows[0]:
                pool = [p for r in rows for p in r["pos"]]
                for i, r in enumerate(rows):
                    others = [p for j, p in enumerate(pool) if p not in r["pos"]]
                    r["neg"] = (list(r.get("neg") or []) + others[i:] + others[:i])[:negatives]
            with open(root / folder / name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (root / "wudao").mkdir(parents=True, exist_ok=True)
    texts = [p for r in _jsonl_rows(DATA / "train" / "cmrc_pairs.jsonl", rows_per_file) for p in r["pos"]]
    with open(root / "wudao" / "part-0.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts)
    return root


def paper_standin_texts(root: Path, eval_dirs: Sequence[Path] = ()) -> list[str]:
    """Every text of the stand-in files (and of `eval_dirs`' jsonl files), for a vocabulary."""
    texts = []
    for path in sorted(Path(root).rglob("*.jsonl")) + [p for d in eval_dirs for p in sorted(Path(d).glob("*.jsonl"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            for value in json.loads(line).values():
                texts += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return texts


def write_local_bert(folder: Path, texts: Sequence[str], hidden: int = 32, layers: int = 2, heads: int = 4,
                     seed: int = 0) -> Path:
    """A Hugging Face BERT checkpoint in `folder`, laid out as a hub checkpoint: save_pretrained's
    config and weights, with the masked-LM head RetroMAE's `mlm_head_init: from_model` copies, and a
    BERT WordPiece tokenizer over every character of `texts` (embedkit.models.vocab's)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    folder = Path(folder)
    tok = save_tokenizer(build_char_vocab(texts), folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


# ---- the contrastive stores' shared zh-mini setup (tests/test_store.py, tests/test_multi_source.py)

# zh-mini's task files as conf/data/zh_mini_task.yaml lists them (prompts included)
from functools import partial  # noqa: E402

from embedkit.data.sources import zh_mini_jsonl  # noqa: E402

TASK_SOURCES = [partial(zh_mini_jsonl, data_dir=str(DATA), file="train/nli_triplets.jsonl", prompt=""),
                partial(zh_mini_jsonl, data_dir=str(DATA), file="train/stsb_hardneg.jsonl", prompt=""),
                partial(zh_mini_jsonl, data_dir=str(DATA), file="train/cmrc_pairs.jsonl")]


def store_module(tok, cache, sources=TASK_SOURCES, **kw):
    from embedkit.data.contrastive import ContrastiveDataModule

    args = dict(batch_size=16, train_group_size=4, query_max_len=48, passage_max_len=96, seed=3,
                query_instruction="为这个句子生成表示以用于检索相关文章：", no_duplicates=True,
                cache_dir=str(cache), store_num_proc=2)
    args.update(kw)
    dm = ContrastiveDataModule(list(sources), **args)
    dm.attach_tokenizer(tok)
    dm.setup()
    return dm


def store_epochs(dm, epochs=(0, 1), limit=None):
    """(indices, query ids, passage ids) of every batch of `epochs`."""
    loader = dm.train_dataloader()
    out = []
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        for n, (idx, batch) in enumerate(zip(loader.batch_sampler, loader)):
            if limit and n >= limit:
                break
            out.append(([i for i, _ in idx], batch["query"]["input_ids"].tolist(),
                        batch["passages"]["input_ids"].tolist()))
    return out


def store_task_tokenizer(folder):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    texts = []
    for f in ("nli_triplets", "stsb_hardneg", "cmrc_pairs"):
        for line in (DATA / "train" / f"{f}.jsonl").open(encoding="utf-8"):
            r = json.loads(line)
            texts += [r["query"], *r["pos"], *r.get("neg", [])]
    return save_tokenizer(build_char_vocab(texts + ["为这个句子生成表示以用于检索相关文章："], min_freq=2),
                          folder)
