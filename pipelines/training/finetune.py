"""LoRA fine-tuning of a Wan video transformer with (or without) a vidsparse method applied, resumably.

What is trained: peft LoRA adapters on the attention projections (diffusers' convention: ``target_modules``
``to_q``, ``to_k``, ``to_v``, ``to_out.0``, rank and alpha), with the base weights frozen, by the rectified-flow
loss the shipped ``tiny-shapes`` model was trained with
(:func:`~vidsparse.pipelines.training.train_tiny.flow_matching_loss`:
velocity MSE; x0 or velocity prediction as the pipeline's scheduler says). ``vidsparse.apply(transformer, method)``
puts the sparse processors on the transformer in train mode, so the adapters learn under the sparse mask they will be
used with (Radial Attention's LoRA length extension, VMoBA's sparse fine-tuning).

Data: the procedural clips of :mod:`vidsparse.pipelines.offline.procedural` with the shipped model's training settings
(:func:`~vidsparse.pipelines.training.train_tiny.procedural_videos`; clip ``i`` of step ``s`` seeded by
``(seed, s, i)``),
or a folder of the user's clips (:class:`ClipFolder`: ``NAME.mp4`` / ``.webm`` / ``.mov`` / ``.mkv`` / ``.avi`` /
``.gif`` / ``.npy`` next to ``NAME.txt``, its caption).

The output folder holds ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (with the adapter's
``LoraConfig`` as metadata, so alpha survives the round trip): stock ``pipe.load_lora_weights(folder)`` loads it, as
do ``vidsparse render --lora`` and ``vidsparse eval --lora``. Next to it: ``checkpoint.pt`` (adapter weights,
optimizer, step, elapsed time; written atomically), ``finetune_config.json`` and ``train_log.jsonl`` (one line per
step: loss, learning rate, step seconds, measured density). A resumed run continues from the checkpoint and, on the
CPU, gives bit for bit the adapter of an uninterrupted run (data and noise are functions of the seed and step).

Gradients through sparse attention need an executor with a backward. :data:`DEFAULT_TRAIN_BACKEND` is the one
used when none is given; :func:`check_backward` tests the chosen one against the ``reference`` executor's autograd
before training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.config import SparseConfig, check_choice, check_fraction, check_int

from . import train_tiny

#: The modules that get adapters: every attention projection, diffusers' convention for video transformers.
LORA_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: The weights file ``load_lora_weights`` looks for in a folder (diffusers' ``LORA_WEIGHT_NAME_SAFE``).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "finetune_config.json"
LOG_NAME = "train_log.jsonl"
#: Executor of the sparse attention in training when none is chosen, per device type. Only executors with autograd
#: qualify: ``cpp`` on the CPU (its C++ backward, float32; ``gather`` writes into preallocated buffers, ``out=``, no
#: autograd, and ``auto`` may pick it for other dtypes or where the kernel cannot be built); FlexAttention on CUDA.
DEFAULT_TRAIN_BACKEND: dict[str, str] = {"cpu": "cpp", "cuda": "flex"}
#: Clip files a data folder may hold (each with a same-stem ``.txt`` caption).
CLIP_SUFFIXES: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".npy")
#: Config fields a resumed run may change: the step count (the learning-rate schedule does not depend on it) and
#: how often it checkpoints.
RESUMABLE_CHANGES = ("steps", "checkpoint_every_s")


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (saved in the run folder; a resumed run must match it).

    Attributes:
        model: The base model, as ``--model`` names it (``tiny-shapes``, a hub id or a folder).
        sparse: The vidsparse method applied in training, or ``None`` for stock (dense) attention. Its executor must
            have a backward (:func:`sparse_training_config` picks one; :func:`check_backward` tests it); its
            fractional ``dense_steps`` / ``dense_last_steps`` (the methods' warm-ups) become 0.
        rank, alpha: LoRA rank and alpha (the adapter's output is scaled by ``alpha / rank``).
        steps: Optimizer steps of the whole run.
        lr: AdamW learning rate after a linear warm-up of ``warmup_steps``; constant afterwards.
        warmup_steps: Linear warm-up steps.
        batch: Clips per step.
        frames, height, width: Training clip geometry (pixels; frames ``4k + 1`` for Wan's VAE, ``2k + 1`` for the
            shapes model's).
        seed: Seeds the data, the noise, caption dropout and the adapters' initial weights.
        data: A folder of clips and captions (:class:`ClipFolder`), or ``None`` for procedural clips.
        caption_dropout: Fraction of captions replaced by ``""`` (keeps classifier-free guidance working).
        pure_noise_fraction: Fraction of samples trained at σ = 1 (the shipped model was trained with 0.3: see
            :class:`~vidsparse.pipelines.training.train_tiny.TrainConfig`).
        weight_decay: AdamW weight decay of the adapters.
        dtype: Torch dtype name of the frozen base model (adapters are trained in float32).
        checkpoint_every_s: Seconds between checkpoints (one is always written at the end).
    """

    model: str = "tiny-shapes"
    sparse: SparseConfig | None = None
    rank: int = 16
    alpha: float = 16.0
    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    batch: int = 1
    frames: int = 31
    height: int = 64
    width: int = 64
    seed: int = 0
    data: str | None = None
    caption_dropout: float = 0.1
    pure_noise_fraction: float = 0.0
    weight_decay: float = 0.0
    dtype: str = "float32"
    checkpoint_every_s: float = 120.0

    def __post_init__(self) -> None:
        check_int("rank", self.rank, minimum=1)
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha!r} is invalid: expected a number > 0.")
        check_int("steps", self.steps, minimum=1)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} is invalid: expected a number > 0.")
        check_int("warmup_steps", self.warmup_steps)
        check_int("batch", self.batch, minimum=1)
        check_int("frames", self.frames, minimum=1)
        check_int("height", self.height, minimum=1)  # the model's token size: check_geometry
        check_int("width", self.width, minimum=1)
        check_fraction("caption_dropout", self.caption_dropout, low_open=False)
        if not 0.0 <= self.pure_noise_fraction < 1.0:
            raise ValueError(f"pure_noise_fraction={self.pure_noise_fraction!r} is invalid: expected 0 <= value < 1.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} is invalid: expected a number >= 0.")
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.sparse is not None:
            # A training forward is one sample at a random noise level: there is no denoising step to count. The
            # methods' default warm-ups are fractions of a denoising run: they are set to 0 here; explicit step
            # counts are refused.
            fractions = {
                n: 0 for n in ("dense_steps", "dense_last_steps") if isinstance(getattr(self.sparse, n), float)
            }
            self.sparse = self.sparse.replace(**fractions)
        if self.sparse is not None and (self.sparse.dense_steps or self.sparse.dense_last_steps):
            raise ValueError(
                f"dense_steps={self.sparse.dense_steps!r} / dense_last_steps={self.sparse.dense_last_steps!r}: "
                "denoising-step schedules do not apply to training (each step sees one random noise level); use 0, "
                "and dense_layers or dense_above_timestep to keep parts of the model dense."
            )

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (the method as its config dict)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["sparse"] = None if self.sparse is None else self.sparse.to_dict()
        return json.loads(json.dumps(data, default=str))  # tuples -> lists, as they come back from the file

    def data_config(self) -> train_tiny.TrainConfig:
        """The procedural data settings: the shipped model's training defaults at this run's seed and size."""
        return train_tiny.TrainConfig(
            seed=self.seed, height=self.height, width=self.width, caption_dropout=self.caption_dropout
        )


def sparse_training_config(config: SparseConfig, backend: str | None, device: torch.device) -> SparseConfig:
    """``config`` with the executor for training on ``device``: ``backend``, or :data:`DEFAULT_TRAIN_BACKEND`'s."""
    return config.replace(backend=backend or DEFAULT_TRAIN_BACKEND.get(device.type, "reference"))


def check_backward(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Check that executor ``backend`` has a backward that agrees with the ``reference`` executor's autograd.

    A small banded plan with a sink block (batch 2, 2 heads, 1000 tokens: 16 blocks of 64, the last one partial) on
    ``device``, long enough for the executors' multi-block paths (gather's windows merged by LSE); q/k/v gradients of
    a random projection of the output are compared. Runs in well under a second (the cpp kernel may compile first).

    Raises:
        ValueError: the executor fails in backward or its gradients disagree (the message names the backend).
    """
    from vidsparse.kernels.dispatch import block_sparse_attention
    from vidsparse.plan import BlockPlan

    gen = torch.Generator().manual_seed(0)
    shape = (2, 1000, 2, 16)
    q, k, v, weight = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    blocks = torch.arange(16)
    mask = ((blocks[:, None] - blocks[None, :]).abs() <= 2) | (blocks[None, :] == 0)
    plan = BlockPlan.from_block_mask(mask.to(device), block_size=64, seq_len=1000)

    def grads(name: str) -> list[torch.Tensor]:
        inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = block_sparse_attention(*inputs, plan, backend=name)
        (out.float() * weight.float()).sum().backward()
        return [x.grad.float() for x in inputs]

    try:
        got = grads(backend)
    except Exception as err:  # any failure means "no usable backward": one message naming the flag
        raise ValueError(
            f"backend={backend!r} cannot train on {device.type}: its backward failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Executors with autograd: reference (any device), "
            "cpp (CPU, float32), flex (CUDA), triton (CUDA)."
        ) from None
    expected = grads("reference")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for name, g, e in zip("qkv", got, expected):
        if not torch.allclose(g, e, rtol=tol, atol=tol):
            error = (g - e).abs().max().item()
            raise ValueError(
                f"backend={backend!r} cannot train on {device.type}: its d{name} differs from the reference "
                f"executor's by {error:.3g} (tolerance {tol})."
            )


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


class ClipFolder:
    """A folder of training clips with captions: ``NAME.<clip suffix>`` next to ``NAME.txt`` (its caption).

    Clips are any of :data:`CLIP_SUFFIXES` (``.npy``: uint8 ``[T, H, W, 3]``), at least ``frames`` frames long, any
    size (resized to the training size, bilinear with antialiasing; keep the aspect ratio of ``height``/``width``).
    The caption file holds the prompt (surrounding whitespace stripped). Clip ``i`` of step ``s`` is a random clip and
    a random ``frames``-long window of it, drawn from ``(seed, s, i)``.

    Args:
        folder: The folder (not searched recursively).
        frames: Frames per training clip.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no clip, a clip without caption (or a caption without clip), an empty caption, or a
            clip shorter than ``frames`` or unreadable (all named in the message).
    """

    def __init__(self, folder: str | os.PathLike, frames: int) -> None:
        from vidsparse.video_io import read_frames

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--data {str(folder)!r}: no such folder.")
        files = sorted(p for p in self.folder.iterdir() if p.is_file())
        clips = [p for p in files if p.suffix.lower() in CLIP_SUFFIXES]
        captions = {p.stem: p for p in files if p.suffix.lower() == ".txt"}
        if not clips:
            raise ValueError(
                f"--data {str(folder)!r} holds no clip: expected files NAME{{{','.join(CLIP_SUFFIXES)}}}, each "
                "with its caption in NAME.txt."
            )
        stems = [p.stem for p in clips]
        if len(set(stems)) != len(stems):
            twice = sorted({s for s in stems if stems.count(s) > 1})
            raise ValueError(f"--data {str(folder)!r}: several clips share a name ({', '.join(twice)}).")
        missing = [p.name for p in clips if p.stem not in captions]
        orphans = sorted(name + ".txt" for name in set(captions) - set(stems))
        if missing or orphans:
            problems = ([f"clips without a caption file: {', '.join(missing)}"] if missing else []) + (
                [f"captions without a clip: {', '.join(orphans)}"] if orphans else []
            )
            raise ValueError(f"--data {str(folder)!r}: {'; '.join(problems)} (each NAME.<clip> needs NAME.txt).")
        self.clips = clips
        self.captions = [captions[p.stem].read_text(encoding="utf-8").strip() for p in clips]
        empty = [p.name for p, c in zip(clips, self.captions) if not c]
        if empty:
            raise ValueError(f"--data {str(folder)!r}: empty caption for {', '.join(empty)}.")
        self.lengths = [read_frames(p).shape[0] for p in clips]  # also fails early on an unreadable clip
        short = [f"{p.name} ({n})" for p, n in zip(clips, self.lengths) if n < frames]
        if short:
            raise ValueError(
                f"--data {str(folder)!r}: clips shorter than --frames {frames}: {', '.join(short)}; use fewer frames."
            )
        self.frames = frames

    def __len__(self) -> int:
        return len(self.clips)

    def batch(
        self, seed: int, step: int, batch: int, height: int, width: int, caption_dropout: float
    ) -> tuple[torch.Tensor, list[str]]:
        """Clips of step ``step``: pixels ``[B, 3, frames, height, width]`` in [-1, 1] and their captions."""
        from vidsparse.video_io import read_frames

        videos, captions = [], []
        for i in range(batch):
            rng = np.random.default_rng((seed, step, i, 2))
            index = int(rng.integers(len(self.clips)))
            start = int(rng.integers(self.lengths[index] - self.frames + 1))
            clip = torch.from_numpy(read_frames(self.clips[index])[start : start + self.frames])
            clip = clip.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, H, W] in [-1, 1]
            if clip.shape[-2:] != (height, width):
                clip = torch.nn.functional.interpolate(
                    clip, size=(height, width), mode="bilinear", antialias=True, align_corners=False
                )
            videos.append(clip.permute(1, 0, 2, 3))
            captions.append("" if rng.random() < caption_dropout else self.captions[index])
        return torch.stack(videos), captions


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def check_trainable(pipe: Any) -> None:
    """Refuse pipelines this trainer does not know how to call: it needs a Wan text-to-video pipeline.

    The loss calls the transformer as ``WanTransformer3DModel`` (latents, timestep, text context) and the text is
    encoded by ``WanPipeline.encode_prompt`` with its zero padding (collapsed in training, see
    :class:`~vidsparse.pipelines.training.train_tiny._CompactPaddingCrossAttention`).
    """
    from diffusers import WanPipeline, WanTransformer3DModel

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(pipe, WanPipeline) or type(transformer) is not WanTransformer3DModel:
        raise ValueError(
            f"--model: finetune supports Wan text-to-video pipelines (WanPipeline with a WanTransformer3DModel, "
            f"e.g. tiny-shapes or Wan-AI/Wan2.1-T2V-1.3B-Diffusers); got {type(pipe).__name__} with "
            f"{type(transformer).__name__}."
        )
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("--model: two-expert Wan 2.2 pipelines (transformer_2) are not supported by finetune yet.")
    if transformer.config.image_dim is not None:
        raise ValueError("--model: image-to-video Wan transformers (image_dim set) are not supported by finetune.")


def check_geometry(pipe: Any, config: FinetuneConfig) -> None:
    """Refuse clip sizes the model cannot encode: frames ``t*k + 1``, height and width multiples of the token size.

    ``t`` is the VAE's temporal factor; a token covers ``VAE spatial factor x patch size`` pixels (16 for Wan 2.1,
    4 for the shapes model).

    Raises:
        ValueError: naming the flag, the value and what is allowed.
    """
    t = getattr(pipe, "vae_scale_factor_temporal", 1) or 1
    if (config.frames - 1) % t:
        below = (config.frames - 1) // t * t + 1
        raise ValueError(
            f"--frames {config.frames} is invalid for this model: frames must be {t}*k + 1 (e.g. {below} or "
            f"{below + t})."
        )
    token = (getattr(pipe, "vae_scale_factor_spatial", 1) or 1) * pipe.transformer.config.patch_size[1]
    for name in ("height", "width"):
        value = getattr(config, name)
        if value % token:
            raise ValueError(f"--{name} {value} is invalid for this model: expected a multiple of {token} pixels.")


def prediction_of(pipe: Any) -> str:
    """``"x0"`` when the pipeline's scheduler integrates x0 predictions (the shapes model), else ``"velocity"``."""
    from ..offline.flow_x0 import FlowMatchEulerX0Scheduler

    return "x0" if isinstance(pipe.scheduler, FlowMatchEulerX0Scheduler) else "velocity"


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Freeze ``transformer`` and add a peft LoRA adapter (float32) on :data:`LORA_TARGET_MODULES`.

    The adapters' ``B`` matrices start at zero (peft's default), so the model starts as the base model; ``A`` is
    drawn from ``seed``. Returns the trainable parameters.
    """
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(LORA_TARGET_MODULES), lora_dropout=0.0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # the base may be bf16; adapters train in float32 (peft casts inputs to them)
    return params


def save_lora(pipe: Any, folder: str | os.PathLike) -> Path:
    """Write ``pipe.transformer``'s adapter to ``folder/pytorch_lora_weights.safetensors`` (diffusers' format).

    Atomic: written to a temporary folder beside it and moved into place with ``os.replace``. The adapter's
    ``LoraConfig`` goes into the file's metadata, so ``load_lora_weights`` restores rank and alpha.
    """
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    tmp = folder / ".lora-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    transformer = pipe.transformer
    type(pipe).save_lora_weights(
        tmp,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    os.replace(tmp / LORA_WEIGHT_NAME, folder / LORA_WEIGHT_NAME)
    tmp.rmdir()
    return folder / LORA_WEIGHT_NAME


def check_lora_folder(path: str | os.PathLike) -> Path:
    """``--lora DIR``: the folder must hold ``pytorch_lora_weights.safetensors`` (or be that file).

    Raises:
        FileNotFoundError: neither.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if not (path / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(
            f"--lora {str(path)!r} holds no {LORA_WEIGHT_NAME} (a folder written by `vidsparse finetune` or a "
            "diffusers LoRA folder is expected)."
        )
    return path


def load_lora(pipe: Any, path: str | os.PathLike) -> None:
    """``pipe.load_lora_weights`` of a folder (or ``.safetensors`` file) checked by :func:`check_lora_folder`."""
    path = check_lora_folder(path)
    if path.is_file():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    else:
        pipe.load_lora_weights(str(path))


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def trim_log(path: Path, step: int) -> None:
    """Drop the records of ``train_log.jsonl`` after ``step``, atomically.

    Those are the steps a killed run did after its last checkpoint, which the resumed run does again.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_run_folder(out: Path, config: FinetuneConfig, resume: bool) -> bool:
    """Whether ``out`` holds a run to resume (False: a new run); refuses to mix runs or settings.

    Raises:
        ValueError: ``out`` holds a run and ``resume`` is False, or its saved settings differ from ``config`` in
            more than :data:`RESUMABLE_CHANGES`.
    """
    ckpt, saved_path = out / CHECKPOINT_NAME, out / CONFIG_NAME
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a folder.")
    if not ckpt.exists():
        return False
    if not resume:
        raise ValueError(
            f"out_dir {str(out)!r} already holds a fine-tuning run ({CHECKPOINT_NAME}): pass --resume to continue "
            "it, or choose another folder."
        )
    saved = json.loads(saved_path.read_text())
    mine = config.to_json()
    differ = sorted(k for k in set(saved) | set(mine) if k not in RESUMABLE_CHANGES and saved.get(k) != mine.get(k))
    if differ:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in differ)
        raise ValueError(
            f"--resume: the settings differ from the run saved in {str(out)!r} ({details}); only --steps may "
            "change. Use the same flags, or another folder."
        )
    return True


def finetune(
    out_dir: str | os.PathLike,
    config: FinetuneConfig,
    pipe: Any,
    *,
    resume: bool = False,
    max_minutes: float | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    data: ClipFolder | None = None,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on ``pipe.transformer`` until ``config.steps`` or ``max_minutes`` (of this call).

    Args:
        out_dir: The run folder (see the module docstring); created when missing.
        config: The run's settings (checked against the saved ones when resuming).
        pipe: The base pipeline, loaded by the caller on its device in ``config.dtype`` (:func:`check_trainable`).
            Its transformer gets the adapter; on return the adapter holds the trained weights, the stock processors
            are back and the transformer is in eval mode: ``pipe`` renders with the fine-tuned model.
        resume: Continue the run saved in ``out_dir`` (a new run when there is none).
        max_minutes: Wall-clock budget of this call; the checkpoint and the LoRA file are written when it ends.
        progress: Show a tqdm bar (loss, seconds per step).
        on_step: Called after each step with ``(step, loss)`` (tests).
        data: ``config.data`` already read as a :class:`ClipFolder` (the command line checks it before loading the
            model); built here when ``None``.

    Returns:
        ``{"step", "steps", "done", "loss" (mean of this call's steps), "elapsed_s" (all calls), "step_s"
        (median seconds per step of this call), "density" (mean measured density of the sparse calls, or None),
        "lora" (the weights file)}``.
    """
    from tqdm.auto import tqdm

    from vidsparse.integration import apply

    out = Path(out_dir)
    check_trainable(pipe)
    check_geometry(pipe, config)
    resuming = check_run_folder(out, config, resume)
    if data is None and config.data is not None:
        data = ClipFolder(config.data, config.frames)
    transformer = pipe.transformer
    device, dtype = next(transformer.parameters()).device, transformer.dtype  # the base's (adapters: float32)
    if config.sparse is not None:
        check_backward(config.sparse.backend, device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=1) + "\n")

    params = add_lora(transformer, config.rank, config.alpha, config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay)
    step, elapsed = 0, 0.0
    if resuming:
        state = torch.load(out / CHECKPOINT_NAME, map_location=device, weights_only=True)
        missing = set(state["lora"]) ^ {n for n, p in transformer.named_parameters() if p.requires_grad}
        if missing:
            raise ValueError(f"--resume: {CHECKPOINT_NAME} in {str(out)!r} does not match the adapter (rank, model).")
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if p.requires_grad:
                    p.copy_(state["lora"][name])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        trim_log(out / LOG_NAME, step)
        trim_log(out / LOG_NAME, step)

    prediction = prediction_of(pipe)
    shift = float(getattr(pipe.scheduler.config, "shift", 1.0))
    stock = transformer.attn_processors
    cross = train_tiny._CompactPaddingCrossAttention()
    transformer.set_attn_processor({n: (cross if ".attn2." in n else p) for n, p in stock.items()})
    handle = apply(transformer, config.sparse) if config.sparse is not None else None
    transformer.train()

    saved = {"step": step}  # the step of the checkpoint on disk

    def checkpoint() -> None:
        lora = {n: p.detach() for n, p in transformer.named_parameters() if p.requires_grad}
        state = {"lora": lora, "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed}
        _save_atomic(state, out / CHECKPOINT_NAME)
        save_lora(pipe, out)
        saved["step"] = step

    losses, step_times, densities = [], [], []
    start = time.perf_counter()
    last_ckpt = start
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="finetune", unit="step")
    try:
        with (out / LOG_NAME).open("a") as log:
            while step < config.steps:
                t0 = time.perf_counter()
                if data is None:
                    videos, captions = train_tiny.procedural_videos(
                        config.data_config(), step, frames=config.frames, batch=config.batch
                    )
                else:
                    videos, captions = data.batch(
                        config.seed, step, config.batch, config.height, config.width, config.caption_dropout
                    )
                with torch.no_grad():
                    latents = train_tiny.encode_videos(pipe, videos)
                    context, cross.bias = train_tiny.encode_captions(pipe, captions, device)
                    cross.bias = cross.bias.to(dtype)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step)
                if handle is not None:
                    handle.reset()  # every training forward is a generation of its own (no step schedule)
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                loss = train_tiny.flow_matching_loss(
                    transformer,
                    latents.to(dtype),
                    context.to(dtype),
                    generator,
                    shift,
                    prediction,
                    config.pure_noise_fraction,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                density = None
                if handle is not None:
                    density = handle.summary()["sparse_density"]
                    handle.clear_stats()
                step += 1
                now = time.perf_counter()
                step_s = now - t0
                elapsed += step_s
                value = loss.item()
                losses.append(value)
                step_times.append(step_s)
                if density is not None:
                    densities.append(density)
                record = {"step": step, "loss": round(value, 5), "lr": config.lr_at(step - 1)}
                record.update({"step_s": round(step_s, 4), "elapsed_s": round(elapsed, 2), "density": density})
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{value:.4f}", step_s=f"{step_s:.2f}")
                bar.update(1)
                if on_step is not None:
                    on_step(step, value)
                out_of_time = max_minutes is not None and now - start > 60 * max_minutes
                if step == config.steps or out_of_time or now - last_ckpt > config.checkpoint_every_s:
                    checkpoint()
                    last_ckpt = now
                if out_of_time:
                    break
            if not (out / LORA_WEIGHT_NAME).exists():
                checkpoint()  # a resumed run that was already done: its files are written anyway
    except KeyboardInterrupt:
        # Ctrl-C between checkpoints: keep the steps done since the last one. The checkpoint is written atomically,
        # so a second Ctrl-C during it leaves the previous one intact.
        if step > saved["step"]:
            checkpoint()
        raise
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
        transformer.set_attn_processor(stock)
        transformer.eval()
    return {
        "step": step,
        "steps": config.steps,
        "done": step >= config.steps,
        "loss": round(float(np.mean(losses)), 5) if losses else None,
        "elapsed_s": round(elapsed, 1),
        "step_s": round(float(np.median(step_times)), 4) if step_times else None,
        "density": round(float(np.mean(densities)), 4) if densities else None,
        "lora": str(out / LORA_WEIGHT_NAME),
    }
