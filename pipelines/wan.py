"""The Wan family: Wan 2.1 (T2V, I2V), Wan 2.2 (two experts, TI2V), on ``WanTransformer3DModel``.

Video self-attention is ``blocks[i].attn1`` (video tokens only, no text); ``attn2`` is cross-attention to the text
(and, for Wan 2.1 I2V, the CLIP image tokens) and stays dense with the stock processor. The grid comes from the
5-D ``hidden_states`` ``[B, C, F, H, W]`` divided by ``config.patch_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from vidsparse.config import SparseConfig

from .base import FamilyAdapter, SparseProcessorMixin, grid_from_5d


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


class WanSparseAttnProcessor(SparseProcessorMixin, WanAttnProcessor):
    """``WanAttnProcessor`` with block-sparse video self-attention.

    Same signature and numerics as the stock processor: cross-attention, dense warm-up steps/layers and anything
    unexpected run the stock ``__call__``; the sparse path repeats its projections, q/k norms and RoPE, then runs
    the planned block-sparse attention instead of the dense dispatch.

    Args:
        config: The method config.
        original: The processor being replaced (its attention backend and parallel config are kept).
    """

    def __init__(self, config: SparseConfig, original: Any = None) -> None:
        WanAttnProcessor.__init__(self)
        self._init_sparse(config, original)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Stock signature; returns ``[B, S, dim]`` like ``WanAttnProcessor``."""
        layout = None
        # Only video self-attention without an extra mask is sparsified; masks (SkyReels' diffusion forcing) are
        # the SkyReels adapter's business.
        if encoder_hidden_states is None and attention_mask is None:
            layout = self.sparse_layout(attn, hidden_states.shape[1])
        if layout is None:
            return WanAttnProcessor.__call__(
                self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rotary_emb(query, *rotary_emb)
            key = apply_wan_rotary_emb(key, *rotary_emb)

        hidden_states = self.sparse_attention(attn, query, key, value, layout)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class WanAdapter(FamilyAdapter):
    """Wan 2.1 / 2.2 (``WanTransformer3DModel``)."""

    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    text_position = "none"
    description = "Wan 2.1 T2V/I2V, Wan 2.2 A14B (two experts) and TI2V: blocks.*.attn1 (video only)"

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
        """``blocks.i.attn1`` with layer index ``i``."""
        return [(f"blocks.{i}.attn1", block.attn1, i) for i, block in enumerate(transformer.blocks)]

    def grid_from_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """From ``hidden_states`` ``[B, C, F, H, W]`` and ``config.patch_size``."""
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        return grid_from_5d(hidden_states, module.config.patch_size)

    def make_processor(self, config: SparseConfig, original: Any) -> WanSparseAttnProcessor:
        """A :class:`WanSparseAttnProcessor`."""
        return WanSparseAttnProcessor(config, original)
