"""The speed switches compute what the plain path computes: unpadded encoding
(model.encoder.unpad), torch.compile of the backbone (model.encoder.compile) and fused AdamW
(objective.optimizer.fused: auto). Their speed is measured in benchmarks/, not here."""

import functools

import pytest
import torch

from embedkit.models.build import tiny_zh_encoder
from embedkit.models.encoder import TextEncoder
from embedkit.models.unpadded import pack
from embedkit.models.vocab import build_char_vocab, save_tokenizer
from embedkit.objectives.base import resolve_fused
from embedkit.objectives.infonce import InfoNCE

from _numerics import RTOL32, RTOL64, assert_close_scaled, scale_of
from helpers import (PASSAGES, QUERIES, assert_same_grads, cached_loss_and_grads, pair_batch,
                     plain_loss_and_grads, tiny_encoder, tokens)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(build_char_vocab(QUERIES + PASSAGES), tmp_path_factory.mktemp("fptok"))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- unpadded encoding

def test_pack_keeps_each_token_and_its_position(tok):
    batch = tokens(tok, ["北京", "上海在长江口", "熊猫"])
    ids, positions, packing = pack(batch["input_ids"], batch["attention_mask"])
    lengths = batch["attention_mask"].sum(1).tolist()
    assert ids.shape == positions.shape == (1, sum(lengths))
    assert positions[0].tolist() == [i for n in lengths for i in range(n)]
    assert packing.cu_seqlens.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    restored = packing.pad(ids[0])
    assert torch.equal(restored, batch["input_ids"] * batch["attention_mask"])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_unpadded_encoder_equals_the_padded_one(tok, pooling):
    # An exactness claim (the same sums over the same real tokens), so float64.
    plain = tiny_encoder(tok, pooling=pooling, num_layers=2).double().eval()
    unpad = tiny_encoder(tok, pooling=pooling, num_layers=2, unpad=True).double().eval()
    batch = tokens(tok, QUERIES)
    assert not bool(batch["attention_mask"].all())   # the batch has padding to leave out
    expected, actual = plain(**batch), unpad(**batch)
    assert_close_scaled(actual, expected, RTOL64, what="embeddings")
    expected.pow(2).sum().backward()
    actual.pow(2).sum().backward()
    assert_same_grads(_grads(unpad), _grads(plain))


def test_unpadded_hidden_states_are_zero_at_the_padding(tok):
    enc = tiny_encoder(tok, unpad=True).eval()
    batch = tokens(tok, QUERIES)
    hidden = enc.hidden_states(**batch)
    assert hidden.shape == (*batch["input_ids"].shape, 32)
    assert torch.equal(hidden[batch["attention_mask"] == 0], torch.zeros_like(hidden[batch["attention_mask"] == 0]))


def test_unpadded_gradcache_step_equals_the_plain_step(tok):
    # GradCache slices rows and replays them through the same packed path.
    module = InfoNCE(tiny_encoder(tok, pooling="mean", dropout=0.0, unpad=True), temperature=0.05).double()
    reference = InfoNCE(tiny_encoder(tok, pooling="mean", dropout=0.0), temperature=0.05).double()
    batch = pair_batch(tok)
    loss, grads = plain_loss_and_grads(reference, batch)
    cached, cached_grads = cached_loss_and_grads(module, batch, mini_batch=4)
    assert_close_scaled(cached, loss, RTOL64, what="loss")
    assert_same_grads(cached_grads, grads)


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_unpadded_roberta_positions_start_after_the_padding_id(tok, model_type):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                               max_position_embeddings=80)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    backbone = AutoModel.from_config(cfg, add_pooling_layer=False).double().eval()
    plain = TextEncoder(backbone, tok, pooling="mean")
    expected = plain(**tokens(tok, QUERIES))
    unpad = TextEncoder(backbone, tok, pooling="mean", unpad=True)
    assert_close_scaled(unpad(**tokens(tok, QUERIES)), expected, RTOL64, what=model_type)


def test_unpad_refuses_a_backbone_it_cannot_position(tok):
    from transformers import DistilBertConfig, DistilBertModel

    backbone = DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2,
                                                hidden_dim=64))
    with pytest.raises(ValueError, match="model.encoder.unpad.*distilbert"):
        TextEncoder(backbone, tok, unpad=True)


def test_unpadded_encoder_without_padding_is_the_plain_path(tok):
    plain = tiny_encoder(tok).double().eval()
    unpad = tiny_encoder(tok, unpad=True).double().eval()
    batch = tokens(tok, ["北京是首都", "上海在江口"])
    assert bool(batch["attention_mask"].all())
    assert_close_scaled(unpad(**batch), plain(**batch), RTOL64)


# ---------------------------------------------------------------- torch.compile

@pytest.mark.slow   # inductor compiles a forward and a backward graph: ~1 min on 2 cores
def test_compiled_encoder_equals_the_plain_one(tok):
    plain = tiny_encoder(tok, dropout=0.0)
    compiled = tiny_encoder(tok, dropout=0.0, compile=True)
    assert compiled.backbone._compiled_call_impl is not None   # the switch reached the backbone
    batch = tokens(tok, QUERIES)
    expected, actual = plain(**batch), compiled(**batch)
    # Fused kernels sum in another order: float32 rounding of one forward (tests/_numerics.py).
    assert_close_scaled(actual, expected, RTOL32, what="embeddings")
    expected.sum().backward()
    actual.sum().backward()
    grads, compiled_grads = _grads(plain), _grads(compiled)
    scale = scale_of(grads)
    for name, g in grads.items():
        assert_close_scaled(compiled_grads[name], g, 10 * RTOL32, scale=scale, what=name)
    # state_dict names unchanged (nn.Module.compile is in place): save and reload work as before
    assert set(compiled.state_dict()) == set(plain.state_dict())


# ---------------------------------------------------------------- fused AdamW

def test_fused_auto_turns_on_for_float_parameters_on_cpu():
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    factory = resolve_fused(functools.partial(torch.optim.AdamW, lr=1e-3, fused="auto"), params)
    assert factory.keywords == {"lr": 1e-3, "fused": True}
    assert factory(params).defaults["fused"] is True


def test_fused_auto_is_left_out_where_there_is_no_fused_kernel():
    class NoFused(torch.optim.SGD):
        def __init__(self, params, lr=0.1):
            super().__init__(params, lr=lr)

    params = [torch.nn.Parameter(torch.randn(3))]
    assert resolve_fused(functools.partial(NoFused, fused="auto"), params).keywords == {}
    ints = [torch.zeros(3, dtype=torch.int64)]
    assert "fused" not in resolve_fused(functools.partial(torch.optim.AdamW, fused="auto"), ints).keywords
    # anything but "auto" is passed through untouched
    plain = functools.partial(torch.optim.AdamW, fused=False)
    assert resolve_fused(plain, params) is plain


def test_fused_adamw_takes_the_same_steps():
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(3)]
    out = {}
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[fused] = p.detach()
    assert_close_scaled(out[True], out[False], RTOL32)
    assert not torch.equal(out[False], start)


def test_objectives_train_with_fused_adamw_by_default(tok, tmp_path):
    import pytorch_lightning as pl

    from helpers import compose

    cfg = compose()
    assert cfg.objective.optimizer.fused == "auto"
    module = InfoNCE(tiny_encoder(tok), temperature=0.05)
    batch = pair_batch(tok)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert trainer.global_step == 1


def test_fused_auto_stays_off_under_mixed_precision_where_lightning_clips(tok, tmp_path):
    import pytorch_lightning as pl

    module = InfoNCE(tiny_encoder(tok), temperature=0.05, grad_cache={"mini_batch": 4})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    overrides = module.trainer_overrides({"gradient_clip_val": 1.0})
    assert overrides["gradient_clip_val"] is None   # GradCache clips itself, through Lightning
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([pair_batch(tok)], batch_size=None))
    assert not trainer.optimizers[0].defaults.get("fused")
    assert trainer.global_step == 1
