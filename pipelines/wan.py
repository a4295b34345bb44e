"""The Wan family: Wan 2.1 (T2V, I2V), Wan 2.2 (two experts, TI2V), on ``WanTransformer3DModel``.

Video self-attention is ``blocks[i].attn1`` (video tokens only, no text); ``attn2`` is cross-attention to the text
(and, for Wan 2.1 I2V, the CLIP image tokens through its extra key/value projections) and stays dense with the stock
processor. The grid comes from the 5-D ``hidden_states`` ``[B, C, F, H, W]`` divided by ``config.patch_size``. Wan 2.2
A14B's two experts (``transformer``, ``transformer_2``) share one runtime, so the step count continues across them.

SkyReels-V2 (``pipelines/skyreels.py``) has the same attention math; :class:`WanStyleSparseMixin` serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from .base import FamilyAdapter, SparseProcessorMixin, causal_groups_from_mask, warn_once


def apply_wan_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs, exactly as ``WanAttnProcessor`` applies it.

    Args:
        x: ``[B, S, H, D]``.
        freqs_cos, freqs_sin: ``[1, S, 1, D]`` (the model's ``rope`` output).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanStyleSparseMixin(SparseProcessorMixin):
    """The sparse ``__call__`` of Wan-style self-attention (Wan, SkyReels-V2).

    Same signature and numerics as the stock processors: cross-attention, dense warm-up steps/layers and anything
    unexpected run the stock ``__call__``; the sparse path repeats the projections, q/k norms and RoPE, then runs the
    planned block-sparse attention instead of the dense dispatch.

    A self-attention mask (SkyReels-V2 diffusion forcing) is ANDed with the plan: it is block-causal over groups of
    latent frames, which the executors apply per token (``causal_groups``); a mask of any other form runs the stock
    dense path with a warning.
    """

    #: The family's q/k/v projection helper (handles fused projections).
    qkv_projections: ClassVar[Callable] = staticmethod(_get_qkv_projections)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Stock signature; returns ``[B, S, dim]`` like the stock processor."""
        layout, groups = None, None
        if encoder_hidden_states is None:  # self-attention; cross-attention always runs stock
            if attention_mask is not None:
                groups = causal_groups_from_mask(attention_mask, hidden_states.shape[1])
                if groups is None:
                    warn_once(
                        (type(self).__name__, "mask"),
                        "vidsparse: this self-attention mask is not block-causal; running it dense (stock).",
                    )
            if attention_mask is None or groups is not None:
                layout = self.sparse_layout(attn, hidden_states.shape[1])
            else:
                # The stock path below passes context parallelism to the dispatch: pick it up for this call.
                self.sync_parallel_config(attn)
        if layout is None:
            return self.stock_call(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = self.qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rotary_emb(query, *rotary_emb)
            key = apply_wan_rotary_emb(key, *rotary_emb)

        hidden_states = self.sparse_attention(attn, query, key, value, layout, causal_groups=groups)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class WanSparseAttnProcessor(WanStyleSparseMixin, WanAttnProcessor):
    """``WanAttnProcessor`` with block-sparse video self-attention (see :class:`WanStyleSparseMixin`)."""


class WanAdapter(FamilyAdapter):
    """Wan 2.1 / 2.2 (``WanTransformer3DModel``)."""

    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    text_position = "none"
    description = "Wan 2.1 T2V/I2V, Wan 2.2 A14B (two experts) and TI2V: blocks.*.attn1 (video only)"
    attention_paths = (("blocks", "attn1"),)
    processor_cls = WanSparseAttnProcessor
    cfg_contexts = ("cond", "uncond")
