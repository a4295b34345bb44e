"""The Mochi family (``MochiTransformer3DModel``).

Joint attention with video first and text after, in every block's ``attn1``. The stock processor loops over the
batch and attends over the video and only that sample's *valid* text tokens, writing the valid text outputs first
and zeros after them. The sparse path does the same in one batched call: the whole padded sequence with the text
padding as ``key_padding_mask`` (so padded keys are never attended, exactly as if they were dropped), then the text
outputs rearranged as the stock processor leaves them.

``MochiAttention`` has no ``set_processor`` and the model no ``set_attn_processor``: the adapter assigns
``module.processor`` per module (the base adapter's fallback). The grid comes from the 5-D ``hidden_states``
``[B, C, F, H, W]`` and the spatial patch size (no temporal patch).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from .base import FamilyAdapter, SparseProcessorMixin, project_heads, text_key_padding


def apply_mochi_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding on interleaved pairs (in float32), exactly as ``MochiAttnProcessor2_0`` applies it.

    Args:
        x: ``[B, S, H, D]``.
        freqs_cos, freqs_sin: ``[S, H, D / 2]``.
    """
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def compact_valid_text(text_out: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """Arrange text outputs as Mochi's stock processor does: each sample's valid tokens first (in order), then zeros.

    Args:
        text_out: ``[B, T, H, D]`` outputs at the original text positions.
        text_valid: bool ``[B, T]``.
    """
    order = torch.sort((~text_valid).to(torch.uint8), dim=1, stable=True).indices  # valid positions first
    compact = torch.gather(text_out, 1, order[:, :, None, None].expand_as(text_out))
    count = text_valid.sum(1, keepdim=True)
    keep = torch.arange(text_valid.shape[1], device=text_valid.device)[None, :] < count
    return compact * keep[:, :, None, None].to(compact.dtype)


class MochiSparseAttnProcessor(SparseProcessorMixin, MochiAttnProcessor2_0):
    """``MochiAttnProcessor2_0`` with block-sparse video attention; valid text stays dense, padded text masked."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock signature; returns ``(video, text)`` like the stock processor."""
        n_video, text_len = hidden_states.shape[1], encoder_hidden_states.shape[1]
        layout = None
        if attention_mask is not None and tuple(attention_mask.shape) == (hidden_states.shape[0], text_len):
            layout = self.sparse_layout(attn, n_video + text_len, text_len=text_len, text_position="after")
        if layout is None:
            return self.stock_call(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value = project_heads(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)
        if image_rotary_emb is not None:  # video tokens only
            query = apply_mochi_rotary_emb(query, *image_rotary_emb)
            key = apply_mochi_rotary_emb(key, *image_rotary_emb)

        text_valid = attention_mask.to(torch.bool)
        out = self.sparse_attention(
            attn,
            torch.cat([query, encoder_query], dim=1),
            torch.cat([key, encoder_key], dim=1),
            torch.cat([value, encoder_value], dim=1),
            layout,
            key_padding_mask=text_key_padding(text_valid, layout),
        )
        out = torch.cat([out[:, :n_video], compact_valid_text(out[:, n_video:], text_valid)], dim=1).flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((n_video, text_len), dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class MochiAdapter(FamilyAdapter):
    """Mochi (``MochiTransformer3DModel``)."""

    name = "mochi"
    model_classes = ("MochiTransformer3DModel",)
    text_position = "after"
    description = "Mochi: transformer_blocks.*.attn1, joint [video, valid text] (processors assigned per module)"
    attention_paths = (("transformer_blocks", "attn1"),)
    processor_cls = MochiSparseAttnProcessor
    cfg_contexts = ("cond_uncond",)
