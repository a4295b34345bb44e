"""The CogVideoX family (``CogVideoXTransformer3DModel``): CogVideoX 1.0 and 1.5 (temporal patch).

Joint attention: every block's ``attn1`` attends over ``[text, video]`` (text first, the padded prompt is attended
as the model does: the pipeline passes no text mask) and returns a ``(video, text)`` tuple. The rotary embedding is
computed by the pipeline and applied to the video part only. The grid comes from ``hidden_states``, which is
``[B, F, C, H, W]`` here (frames before channels), divided by the patch size (``patch_size_t`` for 1.5).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .base import FamilyAdapter, SparseProcessorMixin


class CogVideoXSparseAttnProcessor(SparseProcessorMixin, CogVideoXAttnProcessor2_0):
    """``CogVideoXAttnProcessor2_0`` with block-sparse video self-attention; text rows and columns stay dense.

    An explicit ``attention_mask`` (never passed by the CogVideoX pipelines) runs the stock path.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock signature; returns ``(video [B, N, dim], text [B, T, dim])`` like the stock processor."""
        text_len = encoder_hidden_states.size(1)
        layout = None
        if attention_mask is None:
            layout = self.sparse_layout(
                attn, text_len + hidden_states.size(1), text_len=text_len, text_position="before"
            )
        if layout is None:
            return self.stock_call(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        # Projections, norms and RoPE as the stock processor computes them, on [B, H, S, D].
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)

        out = self.sparse_attention(attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout)
        out = out.flatten(2, 3)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_hidden_states, hidden_states = out.split([text_len, out.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states


class CogVideoXAdapter(FamilyAdapter):
    """CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``)."""

    name = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)
    text_position = "before"
    description = "CogVideoX 1.0 / 1.5: transformer_blocks.*.attn1, joint [text, video], text dense"
    attention_paths = (("transformer_blocks", "attn1"),)
    processor_cls = CogVideoXSparseAttnProcessor
    frames_dim = 1
    cfg_contexts = ("cond_uncond",)
