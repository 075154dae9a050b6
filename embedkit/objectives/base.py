"""What every embedding objective shares: the encoder it trains, the step, the optimisation.

An objective has two parts.

`EmbeddingLoss` (a plain `torch.nn.Module`) is the loss and nothing else: `embed(encoder, batch)`
runs the encoder and returns named tensors, `forward(embeddings, batch)` is a pure function of them
(the loss), `diagnostics(embeddings, batch)` returns what to log beside it, and `eval_targets`,
`save_extras` / `load_extras` cover what the loss adds after training (M3's heads). Loss
hyper-parameters are its constructor's arguments, with the papers' defaults; each objective file
documents its loss class with the same sections: Formula, Paper, Arguments, Batch.

`EmbeddingObjective` (the one `pl.LightningModule` base) owns the encoder, one loss
(`self.loss`) and the optimisation. An objective file declares only

    class InfoNCE(EmbeddingObjective):
        loss_class = InfoNCELoss

and `InfoNCE(encoder, temperature=0.05, lr=1e-3)` splits its arguments: the shared settings below
go to this base, every other one to the loss class. The shared settings are declared here once:

    lr                 the learning rate (None: the optimizer partial's own lr, else 3e-5)
    optimizer          a partial called with the parameter groups, e.g. Hydra's
                       {_target_: torch.optim.AdamW, _partial_: true, weight_decay: ...}
                       (None: AdamW, weight decay 0, betas (0.9, 0.999), eps 1e-8, fused auto);
                       `fused: auto` becomes True where the optimiser has a fused kernel for the
                       parameters' device and dtype, else it is left out (`resolve_fused`)
    scheduler          a partial called as scheduler(optimizer, num_warmup_steps=...,
                       num_training_steps=...), stepped every optimiser step
                       (None: transformers.get_linear_schedule_with_warmup)
    warmup_ratio       the share of the optimiser steps that warm up (None: 0.1)
    on_nonfinite_loss  "error" (None) or "skip", see below
    grad_cache         GradCache settings, {"mini_batch": N} (None or N = null: off)

(conf/objective/base.yaml holds them for every objective config). AdamW with linear warm-up then
linear decay to zero is what FlagEmbedding (via the HF Trainer), RetroMAE and Conan all use; weight
decay skips biases and LayerNorm weights, as HF does: the base builds those two parameter groups and
passes them to the optimizer partial.

Wrappers (Matryoshka, MultiTask) are losses made of losses: they hold their inner objectives' loss
parts, never a nested LightningModule, and only the wrapper's step and optimiser run. An inner
objective given as a class or partial (`objective.inner`, `objective.tasks.<name>` in the configs)
may carry these settings too; where the wrapper sets one, an inner value that differs is an error
(it would otherwise be silently ignored), and where the wrapper leaves one unset (None), the inner
value is used. The configs make the inner settings follow the wrapper's by interpolation.

A NaN or Inf loss stops the run by default (`on_nonfinite_loss="error"`), naming the global step,
batch index and batch size, because one such step silently turns every weight into NaN and the
run would go on to train and evaluate garbage. `"skip"` instead leaves that batch out (no backward,
no parameter update: Lightning's `training_step` returning None) and counts it in
`train/skipped_nonfinite`; the learning-rate schedule still advances. Under DDP the decision is
reduced over ranks (any rank non-finite: every rank errors or skips), so ranks never disagree on
whether to run backward. The total gradient norm before clipping is logged as `train/grad_norm`.

`grad_cache={"mini_batch": N}` trains with GradCache instead of one plain backward
(embedkit/objectives/gradcache.py): the step then runs under Lightning's manual optimisation, which
takes over gradient clipping and accumulation from the Trainer (`trainer_overrides`). Either way the
step leaves its embeddings, detached, in `last_embeddings` for callbacks (dynamic hard-negative
mining reads them).
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch import nn

from embedkit.models.encoder import TextEncoder

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "skip")
#: The settings EmbeddingObjective owns; a loss class never takes them.
SETTINGS = ("lr", "optimizer", "scheduler", "warmup_ratio", "on_nonfinite_loss", "grad_cache")
DEFAULT_LR = 3e-5            # FlagEmbedding's fine-tuning lr for the small model
DEFAULT_WARMUP_RATIO = 0.1   # FlagEmbedding, RetroMAE, M3 scripts


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or Inf; the message names the step and the batch."""


# ---------------------------------------------------------------------- the loss part

class EmbeddingLoss(nn.Module):
    """The loss part of an objective: embeddings in, a scalar loss out; no optimisation state.

    Subclasses implement `embed` and `forward`; `embed_tokens` enables GradCache.
    """

    def __init__(self):
        super().__init__()
        # The optimiser step the owning objective is at; set before every training batch, for
        # losses that change over training (M3's self_distill_start_step).
        self.global_step = 0
        # Wrappers: {"inner": settings} of the shared settings their inner objectives carried
        # (EmbeddingObjective checks them against its own).
        self.inner_settings: dict[str, dict[str, Any]] = {}

    def embed(self, encoder: TextEncoder, batch) -> dict[str, torch.Tensor]:
        """Run the encoder on the batch: named tensors, all that `forward` needs from it."""
        raise NotImplementedError

    def embed_tokens(self, encoder: TextEncoder, side: str,
                     features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of `embed(batch)` that one tokenised column `batch[side]` makes, by itself.

        GradCache embeds each column in row chunks through this; losses that support it return the
        same keys and values as `embed` does for that column."""
        raise NotImplementedError(f"{type(self).__name__} does not support GradCache")

    @property
    def supports_grad_cache(self) -> bool:
        return type(self).embed_tokens is not EmbeddingLoss.embed_tokens

    def forward(self, embeddings: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The loss, a function of `embed`'s tensors (and the batch's labels)."""
        raise NotImplementedError

    def loss_and_grads(self, embeddings, batch, scale: float, rows: int):
        """Optional: GradCache's pass 2 done by the loss itself (InfoNCE, in query blocks), as
        (loss, {key: ∂(scale·loss)/∂embedding}); None leaves it to autograd."""
        return None

    def diagnostics(self, embeddings: dict[str, torch.Tensor], batch) -> dict[str, Any]:
        """What to log beside the loss, as {name: value} (logged as `train/<name>`, no grad).

        Called after `forward` on the same step: it may report values `forward` computed."""
        return {}

    def batch_size_of(self, batch) -> int:
        first = next(iter(batch.values()))
        return int(first["input_ids"].shape[0] if isinstance(first, dict) else first.shape[0])

    def eval_targets(self, encoder: TextEncoder) -> dict[str, dict]:
        """What to evaluate after training: variant label -> keyword arguments of `suite.evaluate`.

        A plain loss evaluates the encoder once (label ""). Matryoshka returns one variant per
        dimension; M3 adds its sparse / multi-vector / hybrid retrieval modes, each with its own mteb
        model (`mteb_model=`) restricted to the task types that mode applies to (`task_types=`).
        """
        return {"": {"encoder": encoder}}

    def save_extras(self, out_dir) -> None:
        """Save what the loss adds beside the encoder (M3's heads); the encoder saves itself."""

    def load_extras(self, out_dir) -> None:
        """Load what `save_extras` wrote, for a trained stage that is evaluated again (a resumed run)."""


def loss_arguments(loss_class: type[EmbeddingLoss], args: tuple, kwargs: Mapping[str, Any]) -> dict:
    """The loss class's arguments by name: positional ones bound in its signature's order, the
    `encoder` argument left out (the objective passes its own)."""
    names = [p.name for p in inspect.signature(loss_class).parameters.values()
             if p.name != "encoder" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{loss_class.__name__} takes {len(names)} positional arguments "
                        f"({', '.join(names)}), got {len(args)}")
    bound = dict(zip(names, args))
    twice = sorted(set(bound) & set(kwargs))
    if twice:
        raise TypeError(f"{loss_class.__name__} got {twice} both by position and by name")
    return {**bound, **kwargs}


def construct_loss(loss_class: type[EmbeddingLoss], encoder, kwargs: Mapping[str, Any]) -> EmbeddingLoss:
    """`loss_class(**kwargs)`, with the encoder for the loss classes that size themselves on it
    (they name an `encoder` argument: M3's heads, RetroMAE's decoder, Matryoshka's width check)."""
    shared = sorted(set(kwargs) & set(SETTINGS))
    if shared:
        raise TypeError(f"{loss_class.__name__} got {shared}: these are the objective's settings "
                        f"(EmbeddingObjective), not loss arguments")
    if "encoder" in inspect.signature(loss_class).parameters:
        return loss_class(encoder=encoder, **kwargs)
    return loss_class(**kwargs)


def build_loss(spec: Any, encoder, kwargs: Mapping[str, Any] | None = None
               ) -> tuple[EmbeddingLoss, dict[str, Any]]:
    """An inner objective's loss part for a wrapper, and the shared settings the spec carried.

    spec: an EmbeddingLoss; an EmbeddingObjective or EmbeddingLoss class, or a partial of one
    (Hydra's `_partial_: true`); or a config with a `_target_`. `kwargs` are added to its arguments
    (the wrapper's extra arguments, e.g. scale=paper's `objective.temperature`). A built
    EmbeddingObjective is refused: it is a LightningModule with its own optimiser, which a wrapper
    would not run."""
    kwargs = dict(kwargs or {})
    if isinstance(spec, EmbeddingLoss):
        for key, value in kwargs.items():
            if getattr(spec, key, None) != value:
                raise ValueError(f"{key}={value!r} cannot be applied to an already built inner "
                                 f"loss (it has {getattr(spec, key, None)!r})")
        return spec, {}
    if isinstance(spec, EmbeddingObjective):
        raise TypeError(f"the inner objective is a built {type(spec).__name__}: give its class or a "
                        f"partial of it (Hydra: _partial_: true), or its loss part "
                        f"({type(spec).__name__}.loss_class(...)); a wrapper composes the inner loss, "
                        f"it does not nest a LightningModule")
    if not callable(spec):
        from omegaconf import DictConfig

        if isinstance(spec, (dict, DictConfig)) and "_target_" in spec:
            from hydra.utils import instantiate

            spec = instantiate(spec, _partial_=True)
        else:
            raise TypeError(f"an inner objective must be an EmbeddingLoss, an objective class, a "
                            f"partial of one or a config with a _target_, got {type(spec).__name__}")
    func, keywords = spec, {}
    while isinstance(func, functools.partial):
        if func.args:
            raise TypeError(f"give the inner objective's arguments by name, not {func.args!r}")
        keywords = {**func.keywords, **keywords}
        func = func.func
    keywords.update(kwargs)
    keywords.pop("encoder", None)   # the wrapper's encoder is the one trained
    if inspect.isclass(func) and issubclass(func, EmbeddingObjective):
        settings = {k: keywords.pop(k) for k in SETTINGS if k in keywords}
        return construct_loss(func.loss_class, encoder, keywords), settings
    if inspect.isclass(func) and issubclass(func, EmbeddingLoss):
        return construct_loss(func, encoder, keywords), {}
    built = func(encoder=encoder, **keywords)
    if isinstance(built, EmbeddingObjective):
        return build_loss(built, encoder)   # refused, with the message above
    if not isinstance(built, EmbeddingLoss):
        raise TypeError(f"the inner objective builder returned {type(built).__name__}, not an "
                        f"EmbeddingLoss")
    return built, {}


# ---------------------------------------------------------------------- the LightningModule

class EmbeddingObjective(pl.LightningModule):
    """The encoder, its loss (`loss_class`) and the shared optimisation; see the module docstring."""

    #: The loss part this objective trains; its arguments are the objective's loss arguments.
    loss_class: type[EmbeddingLoss] | None = None
    #: Arguments holding embedding widths: checked against the encoder's width before training
    #: (embedkit/recipes/preflight.py).
    embedding_width_args: tuple[str, ...] = ()

    def __init__(self, encoder: TextEncoder, *loss_args, lr: float | None = None,
                 optimizer: Any = None, scheduler: Any = None, warmup_ratio: float | None = None,
                 on_nonfinite_loss: str | None = None, grad_cache: Any = None, **loss_kwargs):
        super().__init__()
        if self.loss_class is None:
            raise TypeError(f"{type(self).__name__} names no loss_class")
        self.encoder = encoder
        loss_kwargs = loss_arguments(self.loss_class, loss_args, loss_kwargs)
        self.loss = construct_loss(self.loss_class, encoder, loss_kwargs)
        given = dict(lr=lr, optimizer=optimizer, scheduler=scheduler, warmup_ratio=warmup_ratio,
                     on_nonfinite_loss=on_nonfinite_loss, grad_cache=grad_cache)
        own = {k: v for k, v in given.items() if v is not None}
        settings = _merge_settings(type(self).__name__, own, self.loss.inner_settings)

        self.on_nonfinite_loss = settings.get("on_nonfinite_loss", "error")
        if self.on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite_loss must be one of {NONFINITE_POLICIES}, "
                             f"got {self.on_nonfinite_loss!r}")
        self.optimizer_factory = _plain_partial(settings.get("optimizer")) or functools.partial(
            torch.optim.AdamW, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, fused="auto")
        factory_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if "lr" in settings and factory_lr is not None and factory_lr != settings["lr"]:
            raise ValueError(f"lr={settings['lr']!r} and optimizer.lr={factory_lr!r} disagree; set "
                             f"the learning rate once, as lr (the configs: objective.lr)")
        self.lr = float(settings.get("lr", factory_lr if factory_lr is not None else DEFAULT_LR))
        self.scheduler_factory = settings.get("scheduler")
        self.warmup_ratio = float(settings.get("warmup_ratio", DEFAULT_WARMUP_RATIO))
        self.skipped_nonfinite = 0
        from embedkit.objectives.gradcache import GradCache

        self.grad_cache = GradCache.from_config(settings.get("grad_cache"))
        if self.grad_cache is not None and not self.loss.supports_grad_cache:
            raise ValueError(f"{type(self).__name__} does not support GradCache "
                             f"({type(self.loss).__name__} cannot embed one column at a time); "
                             f"set grad_cache.mini_batch: null")
        # GradCache back-propagates chunk by chunk inside the step: manual optimisation.
        self.automatic_optimization = self.grad_cache is None
        self.last_embeddings = None
        # The arguments, for loggers and checkpoints (the wrappers' inner specs left out), with the
        # settings the run trains with, also where an inner objective supplied them.
        self.save_hyperparameters({
            **{k: v for k, v in loss_kwargs.items() if k not in ("inner", "tasks")}, **given,
            "lr": self.lr, "warmup_ratio": self.warmup_ratio,
            "on_nonfinite_loss": self.on_nonfinite_loss})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # `InfoNCE(encoder, temperature=..., lr=...)`: show the real arguments (the loss class's
        # and the shared settings) to inspect.signature, and so to the config check before a run
        # (embedkit/recipes/signatures.py), instead of the base's **loss_kwargs.
        if cls.__dict__.get("loss_class") is not None and "__init__" not in cls.__dict__:
            cls.__signature__ = _objective_signature(cls.loss_class)

    # ------------------------------------------------------------------ the loss part, bound to the encoder

    def embed(self, batch) -> dict[str, torch.Tensor]:
        return self.loss.embed(self.encoder, batch)

    def embed_tokens(self, side: str, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss.embed_tokens(self.encoder, side, features)

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return self.loss(embeddings, batch)

    def loss_and_grads(self, embeddings, batch, scale: float, rows: int):
        return self.loss.loss_and_grads(embeddings, batch, scale, rows)

    def batch_size_of(self, batch) -> int:
        return self.loss.batch_size_of(batch)

    def eval_targets(self) -> dict[str, dict]:
        return self.loss.eval_targets(self.encoder)

    def save_extras(self, out_dir) -> None:
        self.loss.save_extras(out_dir)

    def load_extras(self, out_dir) -> None:
        self.loss.load_extras(out_dir)

    def trainer_overrides(self, trainer_cfg) -> dict:
        """Trainer arguments this objective must set itself (GradCache: clipping, accumulation)."""
        return self.grad_cache.trainer_overrides(trainer_cfg) if self.grad_cache else {}

    # ------------------------------------------------------------------ the step

    def on_train_batch_start(self, batch, batch_idx) -> None:
        for part in self.loss.modules():
            if isinstance(part, EmbeddingLoss):
                part.global_step = int(self.global_step)

    def training_step(self, batch, batch_idx):
        if self.grad_cache is not None:
            return self.grad_cache.training_step(self, batch, batch_idx)
        embeddings = self.embed(batch)
        self.keep_embeddings(embeddings)
        loss = self.loss_from_embeddings(embeddings, batch)
        size = self.batch_size_of(batch)
        if not self.loss_is_usable(loss, batch_idx, size):
            return None
        self.log_step(loss, embeddings, batch, size)
        return loss

    def keep_embeddings(self, embeddings) -> None:
        """Leave the step's embeddings, detached, in `last_embeddings` for callbacks (dynamic
        hard-negative mining). Detached so that the step's graph is not kept alive until the next."""
        self.last_embeddings = _detached(embeddings)

    def log_step(self, loss: torch.Tensor, embeddings, batch, size: int) -> None:
        """`train/loss` and the loss's diagnostics (`train/<name>`), computed without grad."""
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        with torch.no_grad():
            for name, value in self.loss.diagnostics(embeddings, batch).items():
                self.log(f"train/{name}", value, batch_size=size)

    # ------------------------------------------------------------------ numerics

    def loss_is_usable(self, loss: torch.Tensor, batch_idx: int, batch_size: int) -> bool:
        """True for a finite loss. A non-finite one raises NonFiniteLossError ("error") or is
        counted and reported as unusable ("skip"; the caller then returns None to skip the batch).

        Every training_step calls this before logging or returning its loss. It reads the loss
        on the host (one device sync per step) and, under DDP, reduces the answer over ranks.
        """
        local = bool(torch.isfinite(loss.detach()).all())
        finite = local
        if self._trainer is not None:
            finite = bool(self.trainer.strategy.reduce_boolean_decision(local, all=True))
        if finite:
            self._log_skipped(batch_size)
            return True
        value = loss.detach().float().cpu()
        what = (f"{value.item() if value.numel() == 1 else value.tolist()}" if not local
                else "on another rank")
        where = (f"global step {self.global_step} (epoch {self.current_epoch}, batch index "
                 f"{batch_idx}, batch size {batch_size})")
        if self.on_nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"non-finite training loss ({what}) at {where} in {type(self).__name__}. Lower the "
                f"learning rate or check that batch; objective.on_nonfinite_loss=skip skips such "
                f"batches instead.")
        self.skipped_nonfinite += 1
        log.warning("skipping a non-finite training loss (%s) at %s: %d skipped so far",
                    what, where, self.skipped_nonfinite)
        self._log_skipped(batch_size)
        return False

    def _log_skipped(self, batch_size: int) -> None:
        if self._trainer is not None and self.on_nonfinite_loss == "skip":
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the hyper-parameters as plain Python: Hydra hands nested arguments (grad_cache,
        eval variants, the optimizer partial, ...) over as OmegaConf nodes and functools.partial
        objects, which `torch.load(weights_only=True)` refuses to rebuild, so a resume would fail on
        its own checkpoint."""
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = _plain(dict(checkpoint[key]))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the total 2-norm of the gradients, before clipping (Lightning clips after this hook).

        Equal to Lightning's `grad_norm(self, 2)["grad_2.0_norm_total"]`, computed on the device:
        `grad_norm` gathers every parameter's norm into a CPU tensor, one device sync per parameter.
        """
        grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
        if not grads:
            return   # a skipped batch: nothing was back-propagated
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        self.log("train/grad_norm", torch.linalg.vector_norm(norms), on_step=True, on_epoch=False)
        if self.grad_cache is not None:
            self.grad_cache.clip(self, optimizer)   # Lightning skips clipping in manual optimisation

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
        # The decay group takes the partial's weight_decay; biases and LayerNorm weights none.
        factory = resolve_fused(self.optimizer_factory, decay + no_decay,
                                unscaled=_plain_precision(self.trainer))
        optimizer = factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.grad_cache is not None:
            total = self.grad_cache.total_steps(self.trainer)
        scheduler_factory = self.scheduler_factory
        if scheduler_factory is None:
            from transformers import get_linear_schedule_with_warmup as scheduler_factory
        scheduler = scheduler_factory(optimizer, num_warmup_steps=int(self.warmup_ratio * total),
                                      num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------- settings

def _merge_settings(owner: str, own: dict[str, Any], inner: Mapping[str, Mapping[str, Any]]) -> dict:
    """The wrapper's settings, completed by its inner objectives' where it left one unset; an inner
    value that differs from the wrapper's (or from another inner objective's) is an error."""
    merged, source = dict(own), {k: None for k in own}
    for where, settings in inner.items():
        for key, value in settings.items():
            if value is None:
                continue   # unset there too
            if key not in merged:
                merged[key], source[key] = value, where
            elif not _same_setting(key, merged[key], value):
                theirs = f"the wrapper's {key}={_show(merged[key])}" if source[key] is None else \
                    f"{source[key]}.{key}={_show(merged[key])}"
                raise ValueError(
                    f"{owner}: {where}.{key}={_show(value)} differs from {theirs}. Only {owner}'s "
                    f"own step and optimiser run, so the inner objective's setting would be ignored: "
                    f"set {key} on {owner} (objective.{key}) and leave the inner one following it "
                    f"(the configs interpolate it, {where}.{key}: ${{..{key}}}).")
    return merged


def _same_setting(key: str, a: Any, b: Any) -> bool:
    if key == "grad_cache":
        from embedkit.objectives.gradcache import GradCache

        return GradCache.from_config(_plain(a)) == GradCache.from_config(_plain(b))
    return _plain(a) == _plain(b)


def _show(value: Any) -> str:
    return repr(_plain(value))


def _plain(value: Any) -> Any:
    """Plain Python for OmegaConf nodes and partials (a partial becomes its Hydra config)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, functools.partial):
        func = value.func
        return {"_target_": f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}",
                "_partial_": True, **({"_args_": _plain(list(value.args))} if value.args else {}),
                **_plain(dict(value.keywords))}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _plain_partial(factory: Any) -> Any:
    """An optimizer partial with plain keyword values: a Hydra list (betas) becomes the tuple
    PyTorch's optimisers document, so the optimiser state holds no OmegaConf node either."""
    if not isinstance(factory, functools.partial):
        return factory
    from omegaconf import OmegaConf

    def plain(v):
        v = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        return tuple(v) if isinstance(v, list) else v
    return functools.partial(factory.func, *factory.args, **{k: plain(v) for k, v in factory.keywords.items()})


def resolve_fused(factory: Any, params: list[torch.Tensor], unscaled: bool = True) -> Any:
    """The optimizer partial with `fused="auto"` decided for these parameters: True when the
    optimiser takes `fused`, PyTorch has a fused kernel for their device (CPU too since torch
    2.4), they are floating point and the run's gradients reach the optimiser `unscaled`;
    otherwise the keyword is dropped (the optimiser's default). One fused kernel per step
    replaces a Python loop over the parameters (benchmarks/RESULTS.md).

    Not under mixed precision (`unscaled=False`): a fused optimiser unscales inside its step, so
    Lightning refuses to clip its gradients ("does not allow for gradient clipping") and the
    logged train/grad_norm would be of the scaled gradients."""
    keywords = getattr(factory, "keywords", None)
    if not isinstance(factory, functools.partial) or keywords.get("fused") != "auto":
        return factory
    rest = {k: v for k, v in keywords.items() if k != "fused"}
    try:
        takes_fused = "fused" in inspect.signature(factory.func).parameters
    except (TypeError, ValueError):
        takes_fused = False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:   # a private helper; without it, CUDA is the device every version fuses on
        devices = {"cuda"}
    usable = (takes_fused and unscaled and bool(params)
              and all(p.is_floating_point() and p.device.type in devices for p in params)
              and len({p.device.type for p in params}) == 1)
    return functools.partial(factory.func, *factory.args, **rest, **({"fused": True} if usable else {}))


def _plain_precision(trainer) -> bool:
    """True where the trainer hands the optimiser its gradients as they are: full or true half
    precision, no mixed-precision plugin with a scaler, FSDP or DeepSpeed in between."""
    from pytorch_lightning.plugins.precision import DoublePrecision, HalfPrecision, Precision

    plugin = getattr(trainer, "precision_plugin", None)   # None: a stand-in trainer, no AMP
    return plugin is None or type(plugin) in (Precision, DoublePrecision, HalfPrecision)


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _objective_signature(loss_class: type[EmbeddingLoss]) -> inspect.Signature:
    """(encoder, <loss arguments>, *, <shared settings>[, **kwargs]) with evaluated hints."""
    def params(fn):
        try:
            hints = typing.get_type_hints(fn)
        except Exception:   # noqa: BLE001  an unevaluable hint: keep what is written
            hints = {}
        out = []
        for p in inspect.signature(fn).parameters.values():
            out.append(p.replace(annotation=hints.get(p.name, p.annotation)))
        return out

    base = params(EmbeddingObjective.__init__)
    loss = [p for p in params(loss_class.__init__) if p.name not in ("self", "encoder")]
    encoder = next(p for p in base if p.name == "encoder")
    settings = [p for p in base if p.kind == p.KEYWORD_ONLY]
    positional = [p for p in loss if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in loss if p.kind == p.KEYWORD_ONLY]
    var = [p for p in loss if p.kind == p.VAR_KEYWORD]
    positional = [p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in positional]
    return inspect.Signature([encoder, *positional, *keyword, *settings, *var])
