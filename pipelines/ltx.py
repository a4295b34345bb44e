"""The LTX-Video family (``LTXVideoTransformer3DModel``).

Self-attention is ``transformer_blocks[i].attn1`` (video only); ``attn2`` is cross-attention to the text (with an
additive padding mask) and stays stock. The input is pre-packed ``[B, S, C]``, so the grid cannot be read from its
shape: it comes from the forward's ``num_frames``, ``height`` and ``width`` (latent sizes) divided by the patch
size. Pipelines that prepend conditioning tokens (``LTXConditionPipeline``) break the grid; those calls run dense
with a warning.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, apply_rotary_emb

from .base import FamilyAdapter, SparseProcessorMixin, forward_arguments


class LTXSparseAttnProcessor(SparseProcessorMixin, LTXVideoAttnProcessor):
    """``LTXVideoAttnProcessor`` with block-sparse video self-attention (cross-attention runs stock)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stock signature; returns ``[B, S, dim]`` like the stock processor."""
        layout = None
        if encoder_hidden_states is None and attention_mask is None:
            layout = self.sparse_layout(attn, hidden_states.shape[1])
        if layout is None:
            return self.stock_call(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:  # LTX rotates the flat [B, S, inner] projections
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states = self.sparse_attention(attn, query, key, value, layout)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class LTXAdapter(FamilyAdapter):
    """LTX-Video (``LTXVideoTransformer3DModel``)."""

    name = "ltx"
    model_classes = ("LTXVideoTransformer3DModel",)
    text_position = "none"
    description = "LTX-Video: transformer_blocks.*.attn1 (video only, pre-packed input; grid from forward kwargs)"
    attention_paths = (("transformer_blocks", "attn1"),)
    processor_cls = LTXSparseAttnProcessor
    cfg_contexts = ("cond_uncond",)

    def grid_from_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """From the forward's ``num_frames``, ``height``, ``width`` (latent sizes) and the patch size."""
        arguments = forward_arguments(module, args, kwargs)
        sizes = [arguments.get(name) for name in ("num_frames", "height", "width")]
        if any(not isinstance(size, int) for size in sizes):
            return None
        grid = tuple(size // p for size, p in zip(sizes, self.patch_size(module.config)))
        return grid if min(grid) > 0 else None
