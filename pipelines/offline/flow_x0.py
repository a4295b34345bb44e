"""Flow-matching Euler sampling for a transformer that predicts the clean sample x0 instead of the velocity.

The shapes model works in pixel space (every token is 4×4 pixels × 2 frames × RGB). There, a network that must
output the velocity ``ε - x0`` has to reproduce the noise of every token almost exactly; what it gets wrong leaks
into the estimate of the clean clip, and the samples of our first v-prediction runs showed it as grain and as
scattered single-token specks of the shape colour. Predicting x0 directly (Li & He, "Back to Basics: Let
Denoising Generative Models Denoise", 2025) removes that burden: the network outputs the clean clip, which is smooth.

``WanPipeline`` treats the transformer output as whatever its scheduler's ``step`` expects, and combines the
guided and unguided outputs linearly (classifier-free guidance), which is the same in x0 and in velocity terms for a
fixed noisy sample. So only the scheduler changes: :class:`FlowMatchEulerX0Scheduler` turns the x0 prediction into
the velocity ``(x_σ - x̂0) / σ`` and takes the stock Euler step. The last step (to σ = 0) lands exactly on x̂0.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

# diffusers' pipeline loader looks up the loadable base classes (SchedulerMixin) in the module named by
# model_index.json, so the name must exist here.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401


class FlowMatchEulerX0Scheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` for models that predict x0 (same config, same timesteps and sigmas)."""

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        """Euler step from an x0 prediction ``model_output`` (same shape as ``sample``, ``[B, C, T, H, W]``).

        Per-token timesteps are not supported (Wan 2.2 TI2V's ``expand_timesteps``): the sigma is per step.
        """
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("FlowMatchEulerX0Scheduler: per_token_timesteps is not supported.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index].to(device=sample.device, dtype=torch.float32)
        velocity = (sample.float() - model_output.float()) / sigma  # σ > 0 at every step taken (σ_last = 0 is a target)
        return super().step(velocity.to(model_output.dtype), timestep, sample, *args, **kwargs)
