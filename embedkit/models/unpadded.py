"""Unpadded encoding: the backbone runs on the batch's real tokens only, not on its padding.

A padded batch of B texts of width L holds B·L token slots; real text batches hold far fewer real
tokens (the zh-mini training pairs in random batches of 128: about a fifth, benchmarks/RESULTS.md).
Every linear layer, the LayerNorms and the feed-forward block cost per slot, so here the batch is
packed into one row of T real tokens (`pack`), each keeping its position inside its own text, and
only attention sees the texts apart:

- on CUDA in fp16/bf16 with the flash-attn package installed, `flash_attn_varlen_func` attends
  within each text of the packed row directly (the cumulative lengths `cu_seqlens`);
- otherwise (CPU, float32, no flash-attn) q, k and v are scattered back into the padded (B, L)
  layout for `scaled_dot_product_attention` with the key-padding mask, and the output gathered
  back to the T real tokens: attention stays padded, everything else does not.

The attention function is registered with transformers' AttentionInterface under
`UNPADDED_ATTENTION` and set on the backbone's config; it receives the packing through the
forward's keyword arguments, which BERT-family models hand to their attention unchanged. Called
without one (a batch without padding, or any other caller of the backbone) it is plain SDPA.

The output is scattered back to (B, L, hidden) with zeros at the padding, so pooling and per-token
heads (M3) see the layout they always see. `unpad_supported` names the backbones this is right for:
BERT-family models whose position ids are the token's index in its text (plus RoBERTa's offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

UNPADDED_ATTENTION = "embedkit_unpadded"
PACKING_KWARG = "embedkit_packing"
#: model_type -> first position id: BERT counts from 0, RoBERTa / XLM-R from padding_idx + 1.
_POSITION_START = {"bert": 0, "roberta": None, "xlm-roberta": None}


@dataclass
class Packing:
    """Where the T real tokens of a (B, L) batch sit: `index` into the flattened B·L slots."""

    index: torch.Tensor        # (T,) long, row-major positions of the real tokens
    key_mask: torch.Tensor     # (B, 1, 1, L) bool, True at real tokens (SDPA's key mask)
    cu_seqlens: torch.Tensor   # (B + 1,) int32, cumulative text lengths (flash-attn varlen)
    max_len: int
    batch: int
    width: int

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, *rest) -> (B, L, *rest), zeros at the padding."""
        out = packed.new_zeros((self.batch * self.width, *packed.shape[1:]))
        return out.index_copy(0, self.index, packed).view(self.batch, self.width, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, L, *rest) -> (T, *rest)."""
        return padded.reshape(self.batch * self.width, *padded.shape[2:]).index_select(0, self.index)


def unpad_supported(backbone) -> str | None:
    """None if `unpad` is right for this backbone, else why not."""
    kind = getattr(backbone.config, "model_type", None)
    if kind not in _POSITION_START:
        return (f"model type {kind!r}: unpadded encoding needs position ids that count each "
                f"text's tokens ({sorted(_POSITION_START)})")
    if not getattr(backbone, "_supports_attention_backend", False):
        return f"{type(backbone).__name__} does not take a custom attention function"
    return None


def enable_unpadded(backbone) -> None:
    """Route the backbone's attention through `unpadded_attention` (raises if unsupported)."""
    why = unpad_supported(backbone)
    if why:
        raise ValueError(f"model.encoder.unpad: {why}; set model.encoder.unpad=false")
    _register()
    backbone.config._attn_implementation = UNPADDED_ATTENTION


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_start: int = 0):
    """(packed ids (1, T), position ids (1, T), Packing) of a right- or left-padded batch."""
    batch, width = input_ids.shape
    real = attention_mask.bool()
    index = real.reshape(-1).nonzero().squeeze(1)
    lengths = real.sum(1, dtype=torch.int32)
    # A token's position is its rank among its text's real tokens (right padding: its column).
    positions = (real.cumsum(1) - 1 + position_start).reshape(-1).index_select(0, index)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    packing = Packing(index=index, key_mask=real[:, None, None, :], cu_seqlens=cu,
                      max_len=int(lengths.max()), batch=batch, width=width)
    return input_ids.reshape(-1).index_select(0, index)[None], positions[None], packing


def unpadded_hidden_states(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states (B, L, hidden) computed on the real tokens only."""
    start = _POSITION_START.get(backbone.config.model_type, 0)
    if start is None:
        start = int(backbone.config.pad_token_id) + 1
    ids, positions, packing = pack(input_ids, attention_mask, start)
    hidden = backbone(input_ids=ids, position_ids=positions, attention_mask=None,
                      **{PACKING_KWARG: packing}).last_hidden_state
    return packing.pad(hidden[0])


def unpadded_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs):
    """transformers' attention signature: q, k, v (1, heads, T, d) -> ((1, T, heads, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packing: Packing | None = kwargs.pop(PACKING_KWARG, None)
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))   # (T, heads, d)
    if _flash_varlen_usable(q):
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, packing.cu_seqlens, packing.cu_seqlens,
                                     packing.max_len, packing.max_len, dropout_p=dropout,
                                     softmax_scale=scaling, causal=False)
        return out[None], None
    q, k, v = (packing.pad(t).transpose(1, 2) for t in (q, k, v))   # (B, heads, L, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask, dropout_p=dropout,
                                         scale=scaling)
    return packing.unpad(out.transpose(1, 2))[None], None


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_varlen_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(UNPADDED_ATTENTION, unpadded_attention)
    # A call with a padded mask (no packing) builds SDPA's mask, as the fallback runs SDPA.
    AttentionMaskInterface.register(UNPADDED_ATTENTION, sdpa_mask)
