"""A parameter-free "VAE" that packs pixels into channels: space-to-depth in time and space, nothing learned.

``WanPipeline`` only needs a VAE that reports its scale factors and channel count in ``config`` and decodes latents
back to pixels. Packing ``st`` frames × ``s × s`` pixels × RGB into one latent vector gives exactly that without
training anything, and it reconstructs the input bit for bit (up to float rounding). The project's small trained
model (:mod:`vidsparse.pipelines.offline.shapes`) uses it so that the whole training budget goes to the transformer.

Frame layout follows Wan's causal VAE: ``F = 1 + st * k`` frames give ``T' = 1 + k`` latent frames. The first frame
stands alone in latent frame 0 (it is repeated ``st`` times to fill the channels; decoding averages the copies), and
each further latent frame holds ``st`` consecutive frames.

Latent channel ``c`` of ``z_dim = 3 * st * s * s`` is ``((rgb * st + dt) * s + dy) * s + dx``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """Space-to-depth "autoencoder" with ``AutoencoderKLWan``'s interface (``encode``/``decode``, ``config``).

    Args:
        scale_factor_spatial: Pixels per latent along height and width (``s``).
        scale_factor_temporal: Frames per latent frame after the first (``st``).
        in_channels: Colour channels of the video (3).
        latents_mean, latents_std: Per-latent-channel statistics (``z_dim`` values each) that ``WanPipeline`` uses
            to undo its latent normalisation before :meth:`decode`: ``z_raw = z_model * std + mean``. The defaults
            (0 and 1) leave latents as raw pixel values in [-1, 1].
        z_dim: Latent channels; always ``in_channels * st * s * s`` (accepted so that a saved config loads back).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        scale_factor_spatial: int = 2,
        scale_factor_temporal: int = 2,
        in_channels: int = 3,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        z_dim: int | None = None,
    ) -> None:
        super().__init__()
        if scale_factor_spatial < 1 or scale_factor_temporal < 1:
            raise ValueError(
                f"scale_factor_spatial={scale_factor_spatial}, scale_factor_temporal={scale_factor_temporal}: "
                "both must be positive integers."
            )
        packed = in_channels * scale_factor_temporal * scale_factor_spatial**2
        if z_dim is not None and z_dim != packed:
            raise ValueError(f"z_dim={z_dim} does not match in_channels * st * s * s = {packed}.")
        z_dim = packed
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if values is not None and len(values) != z_dim:
                raise ValueError(f"{name} has {len(values)} values; expected z_dim={z_dim}.")
        self.register_to_config(
            z_dim=z_dim,
            latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z_dim,
            latents_std=list(latents_std) if latents_std is not None else [1.0] * z_dim,
        )
        # No weights; this buffer only carries the module's dtype/device (``ModelMixin.dtype`` reads buffers), and
        # it is not saved.
        self.register_buffer("_dtype_anchor", torch.zeros(()), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs) -> PixelShuffleVAE:
        """Load from a folder holding only ``config.json`` (there are no weights to read).

        ``ModelMixin.from_pretrained`` requires a weights file; this model has none, so it is rebuilt from its
        config. ``dtype`` (or ``torch_dtype``) and ``device_map`` (a single device) are honoured; other loading
        options do not apply and are ignored.
        """
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        model = cls.from_config(config).eval()
        device_map = kwargs.get("device_map")
        if isinstance(device_map, (str, torch.device)):
            model = model.to(device_map)
        torch_dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(torch_dtype, torch.dtype):
            # nn.Module.to: ModelMixin.to warns about fp32-kept modules, which this model has none of.
            model = torch.nn.Module.to(model, torch_dtype)
        return model

    def pack(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, C, F, H, W]`` (``F = 1 + st*k``) -> latents ``[B, z_dim, 1 + k, H/s, W/s]``."""
        s, st = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        b, c, f, h, w = video.shape
        if (f - 1) % st or h % s or w % s:
            raise ValueError(
                f"video shape {tuple(video.shape)}: frames-1 must be divisible by {st} and height/width by {s}."
            )
        first = video[:, :, :1].expand(b, c, st, h, w)  # frame 0 alone fills latent frame 0
        x = torch.cat([first, video[:, :, 1:]], dim=2)
        t = x.shape[2] // st
        x = x.reshape(b, c, t, st, h // s, s, w // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # b, c, dt, dy, dx, t, h', w'
        return x.reshape(b, c * st * s * s, t, h // s, w // s)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, z_dim, T', H', W']`` -> pixels ``[B, C, 1 + st*(T'-1), H'*s, W'*s]`` (inverse of pack)."""
        s, st = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        b, z, t, h, w = latents.shape
        if z != self.config.z_dim:
            raise ValueError(f"latents have {z} channels; this VAE has z_dim={self.config.z_dim}.")
        c = z // (st * s * s)
        x = latents.reshape(b, c, st, s, s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # b, c, t, dt, h', dy, w', dx
        x = x.reshape(b, c, t * st, h * s, w * s)
        first = x[:, :, :st].mean(dim=2, keepdim=True)  # the st copies of frame 0 (equal for encoded video)
        return torch.cat([first, x[:, :, st:]], dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Video ``[B, C, F, H, W]`` in [-1, 1] -> raw latents (deterministic: ``latent_dist.sample() == mode()``)."""
        dist = IdentityDistribution(self.pack(x))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Raw latents ``[B, z_dim, T', H', W']`` -> video ``[B, C, 1 + st*(T'-1), H, W]``, clamped to [-1, 1]."""
        video = self.unpack(z).clamp(-1.0, 1.0)
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode then decode ``sample`` (``[B, C, F, H, W]``): the identity on valid input."""
        return self.decode(self.pack(sample), return_dict=return_dict)
