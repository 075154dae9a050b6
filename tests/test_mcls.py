"""BGE-M3's MCLS (App. B.2) in the dense eval path: a [CLS] every `interval` tokens, the mean of
the [CLS] states as the embedding; checked against the HF backbone run by hand."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.eval.encoder import MtebEncoder, mcls_encode, position_limit

from helpers import PASSAGES, QUERIES, tiny_encoder
from _numerics import RTOL32, assert_close_scaled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A long stand-in document: the toy passages over and over, ~1,100 characters = tokens.
LONG = "。".join(PASSAGES * 9)
TEXTS = [LONG, QUERIES[0], LONG[:300], PASSAGES[3], LONG[:513]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from embedkit.models.vocab import build_char_vocab, save_tokenizer

    return save_tokenizer(build_char_vocab([LONG, *QUERIES]), tmp_path_factory.mktemp("tok"),
                          model_max_length=4096)


@pytest.fixture(scope="module")
def encoder(tok):
    return tiny_encoder(tok, seed=1, dropout=0.0, max_position_embeddings=2048, max_length=2048).eval()


def by_hand(encoder, text, interval, max_length):
    """The procedure written out: the text's tokens, a CLS before each `interval` of them, SEP,
    as few kept tokens as fit `max_length` with the CLS tokens, the HF model, the CLS mean."""
    tok = encoder.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    keep = len(ids)
    while keep + -(-keep // interval) + 1 > max_length:
        keep -= 1
    ids = ids[:keep]
    seq, cls_at = [], []
    for start in range(0, len(ids), interval):
        cls_at.append(len(seq))
        seq += [tok.cls_token_id] + ids[start:start + interval]
    seq.append(tok.sep_token_id)
    assert len(seq) <= max_length
    with torch.no_grad():
        hidden = encoder.backbone(input_ids=torch.tensor([seq])).last_hidden_state[0]
        emb = hidden[cls_at].mean(0)
        if encoder.projection is not None:
            emb = encoder.projection(emb)
        return F.normalize(emb, dim=-1).numpy(), len(cls_at)


@pytest.mark.parametrize("interval, max_length", [(256, 2048), (64, 300)])
def test_mcls_equals_the_procedure_by_hand(encoder, interval, max_length):
    ours = mcls_encode(encoder, TEXTS, batch_size=2, interval=interval, max_length=max_length)
    expected = [by_hand(encoder, t, interval, max_length) for t in TEXTS]
    assert expected[0][1] >= 4   # the long text gets several CLS tokens
    assert_close_scaled(ours, np.stack([e for e, _ in expected]), RTOL32)
    # ... and it is not the plain CLS embedding of the same text
    plain = encoder.encode([LONG], max_length=max_length)
    assert np.abs(ours[0] - plain[0]).max() > 1e-2


def test_mcls_with_a_projection_averages_before_normalising(tok):
    enc = tiny_encoder(tok, seed=2, dropout=0.0, max_position_embeddings=2048, max_length=2048,
                       projection_dim=8).eval()
    ours = mcls_encode(enc, [LONG], batch_size=1, interval=128)
    assert ours.shape == (1, 8)
    assert_close_scaled(ours[0], by_hand(enc, LONG, 128, 2048)[0], RTOL32)


def test_a_text_within_one_interval_is_its_plain_cls_embedding(encoder):
    short = [QUERIES[1], PASSAGES[0], LONG[:200]]
    assert_close_scaled(mcls_encode(encoder, short, batch_size=3, interval=256),
                        encoder.encode(short), RTOL32)


def _loader(texts):
    from torch.utils.data import DataLoader

    return DataLoader([{"text": t} for t in texts], batch_size=2)


RETRIEVAL = SimpleNamespace(name="ToyRetrieval", type="Retrieval")


def test_the_eval_wrapper_is_unchanged_by_default_and_uses_mcls_when_asked(encoder):
    from mteb.types import PromptType

    plain = MtebEncoder(encoder, "toy", "r1").encode(_loader(TEXTS), task_metadata=RETRIEVAL,
                                                     hf_split="test", hf_subset="default",
                                                     prompt_type=PromptType.document)
    np.testing.assert_array_equal(plain, encoder.encode(TEXTS, batch_size=2))   # today's, bit for bit
    wrapped = MtebEncoder(encoder, "toy", "r1", mcls=True, mcls_interval=64, max_length=300)
    got = wrapped.encode(_loader(TEXTS), task_metadata=RETRIEVAL, hf_split="test",
                         hf_subset="default", prompt_type=PromptType.document)
    assert_close_scaled(got, np.stack([by_hand(encoder, t, 64, 300)[0] for t in TEXTS]), RTOL32)


def test_the_eval_configs_pass_mcls_to_the_encoder(monkeypatch, encoder):
    from hydra.utils import instantiate

    from embedkit.eval import cmteb
    from helpers import compose

    seen = {}

    def evaluate_tasks(model, *args, **kwargs):
        seen["m"] = model
        return {}

    monkeypatch.setattr(cmteb, "evaluate_tasks", evaluate_tasks)
    for name in ("mini_cmteb", "cmteb"):
        default = instantiate(compose([f"eval={name}"]).eval)
        assert (default.mcls, default.mcls_interval, default.max_length) == (False, 256, None)
        suite = instantiate(compose([f"eval={name}", "eval.mcls=true", "eval.mcls_interval=64",
                                     "eval.max_length=300"]).eval)
        suite._tasks = []   # no task data needed: the wrapper is what is checked
        seen.clear()
        suite.evaluate(encoder, model_name="toy", revision="r1", output_dir="/nonexistent")
        assert (seen["m"].mcls, seen["m"].mcls_interval, seen["m"].max_length) == (True, 64, 300)


def test_clear_errors(encoder, tok):
    with pytest.raises(ValueError, match=r"max_length 4096 .* exceeds the model's 2048 positions"):
        mcls_encode(encoder, [LONG], batch_size=1, max_length=4096)
    with pytest.raises(ValueError, match="exceeds the model's 2048 positions"):
        MtebEncoder(encoder, "toy", "r1", mcls=True, max_length=4096)   # before any task runs
    with pytest.raises(ValueError, match="mcls_interval"):
        MtebEncoder(encoder, "toy", "r1", mcls=True, mcls_interval=0)
    mean = tiny_encoder(tok, seed=1, pooling="mean", max_position_embeddings=2048, max_length=2048)
    with pytest.raises(ValueError, match="pools 'mean'"):
        MtebEncoder(mean, "toy", "r1", mcls=True)
    with pytest.raises(TypeError, match="needs embedkit's TextEncoder"):
        MtebEncoder(SimpleNamespace(encode=lambda texts, batch_size: None), "toy", "r1", mcls=True)


def test_position_limit_counts_robertas_padding_offset():
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    small = dict(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=8, max_position_embeddings=66)
    assert position_limit(BertModel(BertConfig(**small))) == 66
    # bge-m3 (XLM-R): 8194 positions, ids start at pad + 1 = 2, so 8192 tokens
    assert position_limit(XLMRobertaModel(XLMRobertaConfig(pad_token_id=1, **small))) == 64
