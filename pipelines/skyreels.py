"""The SkyReels-V2 family (``SkyReelsV2Transformer3DModel``): Wan-style blocks, plus diffusion forcing.

Self-attention is ``blocks[i].attn1`` (video only), cross-attention ``attn2`` stays stock, the grid comes from the
5-D ``hidden_states`` like Wan's. The attention math is Wan's, so the processor is :class:`WanStyleSparseMixin` on
top of SkyReels' own stock processor and projection helper.

Diffusion forcing (``SkyReelsV2DiffusionForcingPipeline``, ``num_frame_per_block > 1``): the model passes a boolean
block-causal mask ``[1, 1, S, S]`` to every ``attn1`` (a latent frame sees the frames of its own block and of all
earlier blocks). It is ANDed with the sparse plan, never replaced: the processor turns it into per-token
``causal_groups`` (verified exactly against the mask, once per forward call), the executors drop the block pairs it
hides and mask the rest per token. See :func:`vidsparse.pipelines.base.causal_groups_from_mask`.
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor, _get_qkv_projections

from .base import FamilyAdapter
from .wan import WanStyleSparseMixin


class SkyReelsV2SparseAttnProcessor(WanStyleSparseMixin, SkyReelsV2AttnProcessor):
    """``SkyReelsV2AttnProcessor`` with block-sparse video self-attention (diffusion-forcing mask ANDed)."""

    qkv_projections = staticmethod(_get_qkv_projections)


class SkyReelsV2Adapter(FamilyAdapter):
    """SkyReels-V2 (``SkyReelsV2Transformer3DModel``): T2V, I2V and diffusion forcing."""

    name = "skyreels_v2"
    model_classes = ("SkyReelsV2Transformer3DModel",)
    text_position = "none"
    description = "SkyReels-V2 T2V/I2V/diffusion forcing: blocks.*.attn1 (video only; block-causal mask ANDed)"
    attention_paths = (("blocks", "attn1"),)
    processor_cls = SkyReelsV2SparseAttnProcessor
    cfg_contexts = ("cond", "uncond")
