"""Load the pipeline a ``--model`` names: the library's one loader (the CLI, the eval harness and scripts use it).

``tiny-<name>`` builds an offline pipeline of the real diffusers classes (:mod:`vidsparse.pipelines.offline.tiny`);
anything else goes to diffusers' ``DiffusionPipeline.from_pretrained`` (a local folder or the user's cache).
"""

from __future__ import annotations

from typing import Any

import torch

#: dtype names accepted by ``--dtype`` and eval jobs.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def load_pipeline(
    model: str | None, *, device: torch.device, dtype: torch.dtype, seed: int = 0, lora: str | None = None
) -> tuple[Any, str]:
    """Load ``--model``: ``tiny-<name>`` builds an offline pipeline; anything else goes to ``from_pretrained``.

    ``lora``: a LoRA folder (``--lora``) loaded with the pipeline's ``load_lora_weights``.

    Returns:
        ``(pipeline, name)`` with the pipeline on ``device`` in ``dtype``.
    """
    from vidsparse.pipelines.offline import tiny

    if model is None:
        model = f"tiny-{tiny.default_model_name()}"
    if model.startswith("tiny-"):
        pipe = tiny.build(model[len("tiny-") :], seed=seed)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except OSError as err:  # no such folder / hub id, not cached offline, no network: diffusers' long OSError
            reason = str(err).split(" (")[0].split(". ")[0].strip()
            raise ValueError(
                f"--model {model!r} cannot be loaded: {reason}. Give a local diffusers pipeline folder, a hub id "
                f"already in the cache (or with network), or one of the built-in models: "
                f"{', '.join('tiny-' + name for name in tiny.tiny_names())}."
            ) from err
    if lora is not None:
        from vidsparse.pipelines.training.finetune import load_lora

        load_lora(pipe, lora)
    pipe.to(device=device)
    pipe.set_progress_bar_config(leave=False)
    return pipe, model
