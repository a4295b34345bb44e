"""Train the project's small text-to-video model ("shapes") on procedural clips, on a CPU, resumably.

What is trained: a small ``WanTransformer3DModel`` with rectified-flow matching (``x_t = (1 - σ) x0 + σ ε``, target
``ε - x0``: exactly what ``WanPipeline`` with ``FlowMatchEulerDiscreteScheduler`` integrates). Everything else is
fixed: the "VAE" is the parameter-free :class:`~vidsparse.pipelines.offline.pixel_vae.PixelShuffleVAE`, and the text
encoder is a small ``UMT5EncoderModel`` built from a seed and frozen (its random embeddings are distinct per word,
and :func:`~vidsparse.pipelines.offline.text.attend_to_neighbouring_words` makes its first layer encode word order, so
that
the transformer can tell the shape's colour from the background's).

The data are drawn on the fly from :mod:`vidsparse.pipelines.offline.procedural`; clip ``i`` of step ``s`` is seeded by
``(seed, s, i)``, so a resumed run sees the same data as an uninterrupted one. Training runs in phases of growing
clip length (short clips are cheap; the last phase trains at the render length so that the temporal positions the
model sees at render time are not new to it).

Speed-up that changes nothing mathematically: ``WanPipeline`` pads every prompt with zero vectors to 512 text tokens,
and all those padding keys are equal. Training attends to one copy per caption slot instead and adds
``log(copies)`` to its logit (:class:`_CompactPaddingCrossAttention`), which gives the same attention output as 512
tokens at a fraction of the cost. The shipped model is used with the stock processors and the full padding.

Checkpoints (``checkpoint.pt``: weights, EMA weights, optimizer, step, elapsed time) are written atomically every few
minutes and at the end; ``train(...)`` resumes from one when it exists. ``export(...)`` writes the EMA weights as a
diffusers pipeline folder that ``WanPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.config import check_choice
from vidsparse.pipelines.offline import procedural

from ..offline.flow_x0 import FlowMatchEulerX0Scheduler
from ..offline.pixel_vae import PixelShuffleVAE
from ..offline.positions import PositionalPatchEmbedding, add_absolute_positions, write_marker
from ..offline.text import attend_to_neighbouring_words, build_umt5_encoder, build_word_tokenizer

#: What the transformer can be trained to output (see :class:`TrainConfig`).
PREDICTIONS = ("x0", "velocity")
#: Text length ``WanPipeline`` pads prompts to (its ``max_sequence_length`` default).
PIPELINE_TEXT_LENGTH = 512
#: Width of the text encoder's output (``text_dim`` of the transformer).
TEXT_DIM = 64
#: Seed of the frozen text encoder's weights.
TEXT_ENCODER_SEED = 1234
#: Architecture of the trained transformer (``WanTransformer3DModel`` keyword arguments).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 24,
    "out_channels": 24,
    "text_dim": TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 512,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 64,
}
#: Pixels per latent (spatial) and frames per latent frame (temporal) of the pixel-shuffle VAE.
VAE_SPATIAL, VAE_TEMPORAL = 2, 2
#: Timestep shift, in training (σ distribution) and in the shipped scheduler (sampling steps):
#: ``σ' = s σ / (1 + (s - 1) σ)``. Pixel-space tokens (4×4 pixels × 2 frames) are very redundant, so noise hides
#: the layout only at σ close to 1; unshifted training left that range undertrained and sampling from pure noise
#: gave scattered blocks even though the model denoised well at σ ≤ 0.6 (measured, step 800 of a first run).
SCHEDULER_SHIFT = 5.0


@dataclass(frozen=True)
class Phase:
    """One stage of the curriculum: ``steps`` optimizer steps on clips of ``frames`` frames, ``batch`` per step."""

    steps: int
    frames: int
    batch: int


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint; a resumed run must use the same values).

    Attributes:
        phases: The curriculum, run in order; the learning-rate schedule spans all of it.
        height, width: Training resolution (pixels; multiples of 4).
        lr, warmup_steps, decay_steps, min_lr_ratio: AdamW learning rate: linear warm-up, constant, then a cosine
            decay to ``lr * min_lr_ratio`` over the last ``decay_steps`` (warm-up/stable/decay: a run can be
            extended before its decay starts without changing any step already taken).
        weight_decay: AdamW weight decay.
        ema_decay: Decay of the exponential moving average of the weights (the exported weights).
        caption_dropout: Fraction of captions replaced by the empty prompt (enables classifier-free guidance).
        timestep_shift: Shift applied to the logit-normal σ samples (see :data:`SCHEDULER_SHIFT`).
        pure_noise_fraction: Fraction of samples trained at σ = 1 exactly (pure noise in, the caption alone says
            what to draw). A model trained only at σ < 1 finds where the shape is in the faint signal of its input,
            so at the first sampling step (σ = 1) it places the shape wherever the noise suggests and ignores the
            words that say where it starts ("moves left" = starts at the right edge): run 12's σ = 1 prediction
            moved with the noise seed, not with the motion word. Fine-tuned at 0.25 and then 0.5 for 11 + 6
            minutes, it put the shape at the edge each motion word starts from; the shipped model was trained
            from scratch at 0.3 and moves the shape the prompted way.
        prediction: What the transformer outputs: ``"x0"`` (the clean clip; sampled with
            :class:`~vidsparse.pipelines.offline.flow_x0.FlowMatchEulerX0Scheduler`) or ``"velocity"``
            (``ε - x0``, stock).
        max_shapes: Shapes per clip (1 to 3).
        placement: Where shapes start (:data:`~vidsparse.pipelines.offline.procedural.PLACEMENTS`).
        init_from: ``None``, or a training run folder whose EMA weights (and text side) start this run: fine-tuning
            a finished run with another curriculum (a finished run cannot be extended past its decay).
        new_text_encoder: With ``init_from``: build a fresh text side (:func:`build_untrained_pipeline`'s) instead
            of copying that run's, to move a model trained on an older text encoder onto the current one.
        absolute_positions: Add fixed absolute position features after the patch embedding
            (:mod:`~vidsparse.pipelines.offline.positions`; needed for canonical placement, which RoPE alone cannot
            express).
        backgrounds: Background kinds drawn uniformly (a repeated kind is drawn more often).
        pan_probability: Chance of a camera pan in a clip.
        seed: Seeds the data, the noise and the initial weights.
        checkpoint_every_s: Seconds between checkpoints.
        threads: ``torch.set_num_threads`` for the run.
    """

    phases: tuple[Phase, ...] = (Phase(400, 1, 16), Phase(1200, 5, 4), Phase(600, 15, 2), Phase(300, 31, 1))
    height: int = 64
    width: int = 64
    lr: float = 1.5e-3
    warmup_steps: int = 100
    decay_steps: int = 600
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    timestep_shift: float = SCHEDULER_SHIFT
    pure_noise_fraction: float = 0.0
    prediction: str = "x0"
    max_shapes: int = 1
    placement: str = "canonical"
    absolute_positions: bool = True
    init_from: str | None = None
    new_text_encoder: bool = False
    backgrounds: tuple[str, ...] = ("plain", "gradient")
    pan_probability: float = 0.15
    seed: int = 0
    checkpoint_every_s: float = 300.0
    threads: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.pure_noise_fraction < 1.0:
            raise ValueError(f"pure_noise_fraction={self.pure_noise_fraction!r} is invalid: expected 0 <= value < 1.")

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all phases."""
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> Phase:
        """Return the phase that optimizer step ``step`` (0-based) belongs to."""
        end = 0
        for phase in self.phases:
            end += phase.steps
            if step < end:
                return phase
        return self.phases[-1]

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step``: linear warm-up, constant, cosine decay over the last ``decay_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_start = max(self.warmup_steps, self.total_steps - self.decay_steps)
        if step < decay_start:
            return self.lr
        progress = min(1.0, (step - decay_start) / max(1, self.total_steps - 1 - decay_start))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def same_history(self, other: TrainConfig, steps: int) -> bool:
        """Whether ``other`` runs steps ``0 .. steps-1`` exactly as this config does.

        Same settings, and the same phase (frames, batch) and learning rate at every one of those steps: the
        condition for resuming a run with ``other``, e.g. a longer curriculum.
        """
        mine, theirs = self.to_json(), other.to_json()
        mine.pop("phases"), theirs.pop("phases")
        return mine == theirs and all(
            (self.phase_at(i).frames, self.phase_at(i).batch) == (other.phase_at(i).frames, other.phase_at(i).batch)
            and self.lr_at(i) == other.lr_at(i)
            for i in range(steps)
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly dict (phases as lists)."""
        data = asdict(self)
        data["phases"] = [asdict(p) for p in self.phases]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json`."""
        data = dict(data)
        data["phases"] = tuple(Phase(**p) for p in data["phases"])
        data["backgrounds"] = tuple(data["backgrounds"])
        data.setdefault("placement", "random")  # runs saved before these options existed: random starts, RoPE only
        data.setdefault("absolute_positions", False)
        data.setdefault("init_from", None)
        data.setdefault("new_text_encoder", False)
        data.setdefault("pure_noise_fraction", 0.0)
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------


def data_statistics(height: int = 64, width: int = 64, clips: int = 64, seed: int = 99) -> tuple[float, float]:
    """Mean and standard deviation of procedural clip pixels in [-1, 1] (over ``clips`` clips of 9 frames).

    The latents are normalised by these so the transformer sees unit-variance data: with raw pixel scale
    (variance ≈ 0.1) a flow model first has to learn the data mean and produces noise for a long time.
    """
    values = []
    for i in range(clips):
        spec = procedural.random_clip_spec((seed, i), aspect=width / height, max_shapes=2)
        values.append(procedural.render(spec, 9, height, width) * 2.0 - 1.0)
    data = np.stack(values)
    return float(data.mean()), float(data.std())


def build_untrained_pipeline(
    seed: int = 0,
    *,
    text_dir: str | os.PathLike | None = None,
    prediction: str = "x0",
    absolute_positions: bool = True,
):
    """Build a ``WanPipeline`` with the shapes architecture, a random transformer and the frozen text side.

    Args:
        seed: Seeds the transformer's initial weights.
        text_dir: A folder with ``tokenizer/`` and ``text_encoder/`` saved by a training run: load them from there
            (a run's text side must never change, and a library update could change how a seed initialises it).
            ``None`` builds them in memory (:func:`~vidsparse.pipelines.offline.text.build_umt5_encoder`, with
            :func:`~vidsparse.pipelines.offline.text.attend_to_neighbouring_words` so that word order is encoded).
        prediction: ``"x0"`` or ``"velocity"``: picks the scheduler that matches the transformer's output.
        absolute_positions: Add :mod:`~vidsparse.pipelines.offline.positions` features to the patch embedding.

    Returns:
        ``WanPipeline`` (tokenizer, frozen UMT5 text encoder, :class:`PixelShuffleVAE` normalised to unit variance,
        ``FlowMatchEulerDiscreteScheduler``, ``WanTransformer3DModel``), on the CPU in float32.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    if text_dir is not None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(Path(text_dir) / "tokenizer")
        text_encoder = UMT5EncoderModel.from_pretrained(Path(text_dir) / "text_encoder").eval().requires_grad_(False)
    else:
        tokenizer = build_word_tokenizer(model_max_length=PIPELINE_TEXT_LENGTH)
        text_encoder = build_umt5_encoder(len(tokenizer), TEXT_DIM, seed=TEXT_ENCODER_SEED)
        attend_to_neighbouring_words(text_encoder)
    mean, std = data_statistics()
    z_dim = 3 * VAE_TEMPORAL * VAE_SPATIAL**2
    vae = PixelShuffleVAE(
        scale_factor_spatial=VAE_SPATIAL,
        scale_factor_temporal=VAE_TEMPORAL,
        latents_mean=[round(mean, 6)] * z_dim,
        latents_std=[round(std, 6)] * z_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
    if absolute_positions:
        add_absolute_positions(transformer)
    check_choice("prediction", prediction, PREDICTIONS)
    scheduler_class = FlowMatchEulerX0Scheduler if prediction == "x0" else FlowMatchEulerDiscreteScheduler
    scheduler = scheduler_class(shift=SCHEDULER_SHIFT)
    return WanPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )


def save_text_side(pipe, text_dir: str | os.PathLike) -> None:
    """Save ``pipe``'s tokenizer and text encoder under ``text_dir`` (see :func:`build_untrained_pipeline`)."""
    pipe.tokenizer.save_pretrained(Path(text_dir) / "tokenizer")
    pipe.text_encoder.save_pretrained(Path(text_dir) / "text_encoder")


class _CompactPaddingCrossAttention:
    """Training-only cross-attention processor: equal zero-padding keys collapsed into a few weighted ones.

    ``WanPipeline`` feeds 512 text vectors, the caption's then zeros; every zero vector becomes the same key and value
    in every layer. Attending to ``n`` slots of them with ``log(copies / n)`` added to their logits is the same
    softmax as attending to ``copies`` of them. ``bias`` is that additive mask, ``[B, S_text]``, set per batch.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.stock = WanAttnProcessor()
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        """Stock Wan attention with :attr:`bias` as the additive attention mask."""
        return self.stock(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def encode_captions(pipe, captions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Compact text context for :class:`_CompactPaddingCrossAttention`, on ``device`` (where the text encoder is).

    Returns:
        ``context [B, L + 1, TEXT_DIM]`` (each caption's token vectors, then zeros; ``L`` the longest caption) and
        ``bias [B, L + 1]``: 0 on caption tokens, ``log((512 - len) / (L + 1 - len))`` on the zero slots, so that
        they weigh as much as the 512-token padding of ``WanPipeline``.
    """
    lengths = [len(ids) for ids in pipe.tokenizer(captions, add_special_tokens=True)["input_ids"]]
    longest = max(lengths)
    context, _ = pipe.encode_prompt(
        captions, do_classifier_free_guidance=False, max_sequence_length=longest + 1, device=torch.device(device)
    )
    bias = torch.zeros(len(captions), longest + 1, device=device)
    for row, n in enumerate(lengths):
        bias[row, n:] = math.log((PIPELINE_TEXT_LENGTH - n) / (longest + 1 - n))
    return context, bias


def sample_batch(pipe, config: TrainConfig, step: int, *, frames: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    """Clips of optimizer step ``step``: normalised latents ``[B, z_dim, T', H/2, W/2]`` and their captions.

    :func:`procedural_videos` encoded by :func:`encode_videos`.
    """
    videos, captions = procedural_videos(config, step, frames=frames, batch=batch)
    return encode_videos(pipe, videos), captions


def procedural_videos(config: TrainConfig, step: int, *, frames: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    """The procedural clips of optimizer step ``step``: pixels ``[B, 3, frames, H, W]`` in [-1, 1] and captions.

    Each clip is a random temporal crop of a procedural scene (within the reference length where the described
    motion happens); with probability ``config.caption_dropout`` its caption is replaced by ``""``. Clip ``i`` is
    seeded by ``(config.seed, step, i)``: the same step always draws the same clips.
    """
    videos, captions = [], []
    for i in range(batch):
        rng = np.random.default_rng((config.seed, step, i, 1))
        spec = procedural.random_clip_spec(
            (config.seed, step, i),
            aspect=config.width / config.height,
            max_shapes=config.max_shapes,
            backgrounds=config.backgrounds,
            pan_probability=config.pan_probability,
            placement=config.placement,
        )
        # Random placement: a random temporal crop. Canonical: always from frame 0, as rendered, so that the clip (and
        # where the shape is at each latent frame) follows from the caption alone.
        last_start = 0 if config.placement == "canonical" else procedural.REFERENCE_FRAMES - frames
        start = int(rng.integers(0, max(1, last_start + 1)))
        clip = procedural.render(spec, frames, config.height, config.width, start_frame=start)
        videos.append(torch.from_numpy(clip).permute(3, 0, 1, 2) * 2.0 - 1.0)  # [3, F, H, W] in [-1, 1]
        captions.append("" if rng.random() < config.caption_dropout else procedural.caption(spec))
    return torch.stack(videos), captions


def encode_videos(pipe, videos: torch.Tensor) -> torch.Tensor:
    """Pixels ``[B, 3, F, H, W]`` in [-1, 1] -> VAE latents normalised as the Wan pipelines do, ``(z - mean) / std``.

    The result is on the VAE's device and dtype (``[B, z_dim, T', H', W']``).
    """
    param = next(pipe.vae.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (pipe.device, pipe.dtype)
    latents = pipe.vae.encode(videos.to(device=device, dtype=dtype)).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return (latents - mean) / std


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    shift: float = 1.0,
    prediction: str = "x0",
    pure_noise_fraction: float = 0.0,
) -> torch.Tensor:
    """Rectified-flow loss on ``latents [B, C, T, H, W]`` with shifted logit-normal σ (mean 0, std 1, ``shift``).

    ``x_σ = (1 - σ) x0 + σ ε``; the transformer gets timestep ``1000 σ`` (as ``WanPipeline`` passes it). The loss
    is the velocity MSE against ``ε - x0`` in both cases; with ``prediction="x0"`` the transformer outputs x̂0 and
    the velocity is ``(x_σ - x̂0) / max(σ, 0.05)`` (x-prediction, v-loss; the floor keeps low-noise weights finite).
    A ``pure_noise_fraction`` of the samples get σ = 1 (the loss is then the MSE of x̂0 against the clip).
    """
    b = latents.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator))
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    if pure_noise_fraction > 0:  # drawn only then, so runs without it keep their exact random stream
        sigma = torch.where(torch.rand(b, generator=generator) < pure_noise_fraction, 1.0, sigma)
    noise = torch.randn(latents.shape, generator=generator)
    # Drawn on the CPU (``generator``'s device) so the stream does not depend on where the model runs.
    sigma, noise = sigma.to(latents), noise.to(latents)
    s = sigma.view(b, 1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = transformer(noisy, sigma * 1000.0, context, return_dict=False)[0]
    if prediction == "x0":
        pred = (noisy - pred) / s.clamp(min=0.05)
    return torch.nn.functional.mse_loss(pred, noise - latents)


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    max_minutes: float | None = None,
    log_every: int = 25,
) -> dict[str, Any]:
    """Train (or resume) in ``out_dir`` until the curriculum ends or ``max_minutes`` of this run have passed.

    Args:
        out_dir: Holds ``checkpoint.pt``, ``config.json``, ``text/`` (the frozen tokenizer and text encoder) and
            ``train_log.jsonl`` (one JSON line per ``log_every``
            steps: step, phase frames, mean loss, learning rate, elapsed seconds over all runs).
        config: The run's settings; ``None`` resumes with the saved ones (or the defaults for a new run). A config
            that differs from the saved one must agree with it on every step already taken
            (:meth:`TrainConfig.same_history`), else ``ValueError``.
        max_minutes: Wall-clock budget of this call; a checkpoint is written when it runs out.
        log_every: Steps per line of ``train_log.jsonl``.

    Returns:
        ``{"step", "total_steps", "elapsed_s", "cpu_s", "done"}`` (CPU seconds of this process, all threads).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, config_path, log_path = out / "checkpoint.pt", out / "config.json", out / "train_log.jsonl"
    if config_path.exists():
        saved = TrainConfig.from_json(json.loads(config_path.read_text()))
        if config is not None and config.to_json() != saved.to_json():
            taken = int(torch.load(ckpt_path, weights_only=True)["step"]) if ckpt_path.exists() else 0
            if not config.same_history(saved, taken):
                raise ValueError(
                    f"config differs from the one saved in {str(config_path)!r} for steps already taken ({taken}): "
                    "a run can only be extended (more steps in its current or later phases, before the decay); "
                    "use a new out_dir."
                )
            with log_path.open("a") as log:
                log.write(json.dumps({"extended_at_step": taken, "phases": config.to_json()["phases"]}) + "\n")
        config = config or saved
    config = config or TrainConfig()
    config_path.write_text(json.dumps(config.to_json(), indent=1))
    torch.set_num_threads(config.threads)

    text_dir = out / "text"
    if config.init_from is not None and not config.new_text_encoder and not text_dir.exists():
        shutil.copytree(Path(config.init_from) / "text", text_dir)  # the fine-tuned weights expect that text side
    pipe = build_untrained_pipeline(
        config.seed,
        text_dir=text_dir if text_dir.exists() else None,
        prediction=config.prediction,
        absolute_positions=config.absolute_positions,
    )
    if not text_dir.exists():
        save_text_side(pipe, text_dir)
    transformer = pipe.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        transformer.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay
    )
    step, elapsed, cpu = 0, 0.0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        transformer.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, cpu = int(state["step"]), float(state["elapsed"]), float(state.get("cpu", 0.0))
    elif config.init_from is not None:
        start = torch.load(Path(config.init_from) / "checkpoint.pt", map_location="cpu", weights_only=True)["ema"]
        transformer.load_state_dict(start)
        ema.load_state_dict(start)

    cross = _CompactPaddingCrossAttention()
    transformer.set_attn_processor(
        {name: (cross if ".attn2." in name else proc) for name, proc in transformer.attn_processors.items()}
    )

    def checkpoint() -> None:
        _save_atomic(
            {
                "model": transformer.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "cpu": cpu,
            },
            ckpt_path,
        )

    run_start = last_tick = last_ckpt = time.time()
    last_cpu = time.process_time()
    losses: list[float] = []
    with log_path.open("a") as log:
        while step < config.total_steps:
            phase = config.phase_at(step)
            latents, captions = sample_batch(pipe, config, step, frames=phase.frames, batch=phase.batch)
            with torch.no_grad():
                context, cross.bias = encode_captions(pipe, captions)
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            loss = flow_matching_loss(
                transformer,
                latents,
                context,
                generator,
                config.timestep_shift,
                config.prediction,
                config.pure_noise_fraction,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), transformer.parameters()):
                    e.lerp_(p, 1 - decay)
            losses.append(loss.item())
            step += 1
            now = time.time()
            elapsed += now - last_tick
            cpu += time.process_time() - last_cpu
            last_tick, last_cpu = now, time.process_time()
            if step % log_every == 0 or step == config.total_steps:
                record = {
                    "step": step,
                    "frames": phase.frames,
                    "batch": phase.batch,
                    "loss": round(sum(losses) / len(losses), 4),
                    "lr": round(config.lr_at(step - 1), 6),
                    "elapsed_s": round(elapsed, 1),
                    "cpu_s": round(cpu, 1),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                losses.clear()
            out_of_time = max_minutes is not None and now - run_start > 60 * max_minutes
            if now - last_ckpt > config.checkpoint_every_s or out_of_time or step == config.total_steps:
                checkpoint()
                last_ckpt = now
            if out_of_time:
                break
    return {
        "step": step,
        "total_steps": config.total_steps,
        "elapsed_s": round(elapsed, 1),
        "cpu_s": round(cpu, 1),
        "done": step >= config.total_steps,
    }


def load_checkpoint_pipeline(out_dir: str | os.PathLike, *, use_ema: bool = True):
    """Load a training run's pipeline with its current (EMA by default) transformer weights."""
    out = Path(out_dir)
    config = TrainConfig.from_json(json.loads((out / "config.json").read_text()))
    pipe = build_untrained_pipeline(
        config.seed, text_dir=out / "text", prediction=config.prediction, absolute_positions=config.absolute_positions
    )
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    pipe.transformer.load_state_dict(state["ema" if use_ema else "model"])
    pipe.transformer.eval()
    return pipe


def export(out_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the run's EMA weights as a diffusers pipeline folder (safetensors) at ``target``.

    The folder holds ``model_index.json``, ``transformer/``, ``vae/`` (config only), ``scheduler/``,
    ``text_encoder/`` and ``tokenizer/``: ``WanPipeline.from_pretrained(target)`` loads it without vidsparse's
    builders (the VAE class is importable as ``vidsparse.pipelines.offline.pixel_vae``).
    """
    pipe = load_checkpoint_pipeline(out_dir)
    target = Path(target)
    pipe.save_pretrained(target, safe_serialization=True)
    if isinstance(pipe.transformer.patch_embedding, PositionalPatchEmbedding):
        write_marker(target)  # the loader (vidsparse.pipelines.offline.shapes) re-adds the features
    # transformers 5 records the tokenizer class as "TokenizersBackend", a name 4.x lacks; both know it as
    # PreTrainedTokenizerFast. Drop the machine-specific loading flags it also writes.
    index_path, tok_path = target / "model_index.json", target / "tokenizer" / "tokenizer_config.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tok.pop(key, None)
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")
    return target
