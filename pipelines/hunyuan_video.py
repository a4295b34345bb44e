"""The HunyuanVideo family: HunyuanVideo and HunyuanVideo 1.5.

The transformers are ``HunyuanVideoTransformer3DModel`` and ``HunyuanVideo15Transformer3DModel``.

Joint attention with video first and text after. HunyuanVideo has dual-stream blocks (``transformer_blocks.*.attn``,
separate text projections ``add_*_proj``) and single-stream blocks (``single_transformer_blocks.*.attn``, one set of
projections over the concatenated sequence); HunyuanVideo 1.5 has dual-stream blocks only. Both pad the text and
mask the padding with a boolean mask:

- HunyuanVideo: ``[B, 1, 1, S]`` over the whole sequence, a key padding mask (padded queries still attend);
- HunyuanVideo 1.5: ``[B, T]`` over the text (image, ByT5 and MLLM tokens, valid ones first); the model attends
  with ``valid(query) & valid(key)``, so padded query rows come out as zeros.

The sparse path passes the padding to the executors as ``key_padding_mask`` (ANDed with the plan) and zeroes padded
query rows where the model does. The token refiner (``context_embedder``) is text-only attention and is never
touched. The grid comes from the 5-D ``hidden_states`` ``[B, C, F, H, W]``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from .base import FamilyAdapter, SparseProcessorMixin, project_heads, sequence_validity


class HunyuanStyleSparseMixin(SparseProcessorMixin):
    """The sparse ``__call__`` of HunyuanVideo-style joint attention (HunyuanVideo, HunyuanVideo 1.5).

    Mirrors the stock processors: RoPE on the video part, text appended after the video (single-stream blocks
    concatenate before the projections, dual-stream blocks project text separately), output split back into
    ``(video, text)``.
    """

    #: True when the model masks padded *queries* too (HunyuanVideo 1.5): their output rows are zero.
    zero_padded_queries: ClassVar[bool] = False

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stock signature; returns ``(video, text)`` like the stock processors."""
        n_video = hidden_states.shape[1]
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        seq_len = n_video + text_len
        try:
            valid = sequence_validity(attention_mask, hidden_states.shape[0], seq_len)
        except ValueError:
            valid = False  # a mask of another form: stock path
        layout = None
        if valid is not False:
            layout = self.sparse_layout(attn, seq_len, text_len=text_len, text_position="after")
        if layout is None:
            return self.stock_call(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = project_heads(attn, hidden_states)
        if image_rotary_emb is not None:  # video tokens only
            query = torch.cat(
                [apply_rotary_emb(query[:, :n_video], image_rotary_emb, sequence_dim=1), query[:, n_video:]], 1
            )
            key = torch.cat([apply_rotary_emb(key[:, :n_video], image_rotary_emb, sequence_dim=1), key[:, n_video:]], 1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        out = self.sparse_attention(attn, query, key, value, layout, key_padding_mask=valid)
        if self.zero_padded_queries and valid is not None:
            out = out * valid[:, :, None, None].to(out.dtype)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out, None
        out, encoder_out = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_out = attn.to_add_out(encoder_out)
        return out, encoder_out


class HunyuanVideoSparseAttnProcessor(HunyuanStyleSparseMixin, HunyuanVideoAttnProcessor2_0):
    """``HunyuanVideoAttnProcessor2_0`` with block-sparse video attention (dual- and single-stream blocks)."""


class HunyuanVideo15SparseAttnProcessor(HunyuanStyleSparseMixin, HunyuanVideo15AttnProcessor2_0):
    """``HunyuanVideo15AttnProcessor2_0`` with block-sparse video attention (padded queries zeroed as the model)."""

    zero_padded_queries = True


class HunyuanVideoAdapter(FamilyAdapter):
    """HunyuanVideo (``HunyuanVideoTransformer3DModel``): T2V and I2V (``token_replace`` leaves attention alone)."""

    name = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    text_position = "after"
    description = (
        "HunyuanVideo: transformer_blocks.*.attn + single_transformer_blocks.*.attn, joint [video, text], "
        "padded text masked; token refiner untouched"
    )
    attention_paths = (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn"))
    processor_cls = HunyuanVideoSparseAttnProcessor
    cfg_contexts = ("cond", "uncond")


class HunyuanVideo15Adapter(FamilyAdapter):
    """HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``)."""

    name = "hunyuan_video_1.5"
    model_classes = ("HunyuanVideo15Transformer3DModel",)
    text_position = "after"
    description = (
        "HunyuanVideo 1.5: transformer_blocks.*.attn, joint [video, image+ByT5+MLLM text], padding masked; "
        "token refiner untouched"
    )
    attention_paths = (("transformer_blocks", "attn"),)
    processor_cls = HunyuanVideo15SparseAttnProcessor
    cfg_contexts = ("pred_cond", "pred_uncond")
