"""Compare training arms of the shipped model: the same prompts and seeds through several (LoRA, method) pairs.

The measurement behind the training experiments (Radial's length extension, VMoBA's sparse fine-tuning): each arm
is the shipped ``tiny-shapes`` pipeline, optionally with a LoRA from ``vidsparse finetune`` and a sparse method for
inference. Every prompt is rendered by every arm in turn (arms interleaved per prompt, so the render times of one
run are comparable as ratios on a noisy machine), then each arm gets:

- prompt following and temporal consistency of each clip (:mod:`vidsparse.eval.prompt_following`);
- PSNR / SSIM / LPIPS against the reference arm's clip of the same prompt and seed;
- the render time per clip, and its ratio to the reference arm's;
- its training cost, read from the LoRA folder's ``train_log.jsonl`` (steps, median step time, total time).

    vidsparse eval arms --out runs/arms --frames 61 --reference dense
        --arm base= --arm dense=runs/dense61 --arm radial=runs/radial61@radial:density=0.25   (one line)
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.config import SparseConfig, check_int
from vidsparse.methods import parse_method_spec

from .prompt_following import FOLLOWING, prompt_following, temporal_consistency

#: First seed of the prompts (prompt ``i`` uses ``SEED + i``, as the shapes sample sheet does).
SEED = 100


@dataclass(frozen=True)
class Arm:
    """One arm: a name, an optional LoRA folder and an optional sparse method (None: stock dense attention)."""

    name: str
    lora: str | None = None
    method: SparseConfig | None = None

    def describe(self) -> str:
        """``dense: LoRA runs/dense61, stock attention``."""
        method = "stock attention" if self.method is None else f"method {self.method.method}"
        return f"{self.name}: {'LoRA ' + self.lora if self.lora else 'no LoRA'}, {method}"


def parse_arm(text: str) -> Arm:
    """``NAME=[LORA_DIR][@METHOD_SPEC]``: e.g. ``base=``, ``dense=runs/d``, ``radial=runs/r@radial:density=0.25``.

    Raises:
        ValueError: no ``=``, an empty name, or a bad method spec (named in the message).
    """
    name, eq, rest = text.partition("=")
    if not eq or not name.strip():
        raise ValueError(
            f"--arm {text!r} is invalid: expected NAME=[LORA_DIR][@METHOD_SPEC], e.g. 'base=' or "
            "'radial=runs/radial61@radial:density=0.25'."
        )
    lora, _, spec = rest.partition("@")
    method = None
    if spec.strip() and spec.strip() != "none":
        try:
            method = parse_method_spec(spec.strip())
        except ValueError as err:
            raise ValueError(f"--arm {text!r}: {err}") from err
    return Arm(name.strip(), lora.strip() or None, method)


def check_arms(arms: Sequence[Arm], reference: str) -> None:
    """Refuse, before loading anything: fewer than two arms, repeated names, a missing LoRA, an unknown reference."""
    from vidsparse.pipelines.training.finetune import check_lora_folder

    if len(arms) < 2:
        raise ValueError(f"--arm was given {len(arms)} time(s); a comparison needs at least two arms.")
    names = [a.name for a in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--arm names must be unique; repeated: {', '.join(repeated)}.")
    if reference not in names:
        raise ValueError(f"--reference {reference!r} is not an arm; arms: {', '.join(names)}.")
    for arm in arms:
        if arm.lora is not None:
            check_lora_folder(arm.lora)


def training_summary(lora: str | None) -> dict[str, Any] | None:
    """Steps, median step time and total time of the run that wrote ``lora`` (from its ``train_log.jsonl``)."""
    if lora is None:
        return None
    log = Path(lora) / "train_log.jsonl"
    config = Path(lora) / "finetune_config.json"
    if not log.is_file():
        return {"log": None}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    step_s = [r["step_s"] for r in rows if "step_s" in r]
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "median_step_s": round(statistics.median(step_s), 3) if step_s else None,
        "total_s": round(sum(step_s), 1),
        "final_loss_mean_last_20": round(statistics.fmean(r["loss"] for r in rows[-20:]), 5) if rows else None,
        "config": json.loads(config.read_text()) if config.is_file() else None,
    }


def compare_arms(
    arms: Sequence[Arm],
    *,
    reference: str,
    frames: int,
    height: int = 64,
    width: int = 64,
    steps: int = 10,
    guidance_scale: float = 4.0,
    prompts: int = len(FOLLOWING),
    lpips_net: str | None = "alex",
    load: Callable[[], Any] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Render :data:`FOLLOWING`'s first ``prompts`` prompts with every arm and measure them.

    Args:
        arms: The arms (:func:`parse_arm`); ``reference`` names the one the others are compared with.
        frames, height, width, steps, guidance_scale: The render settings, the same for every arm.
        prompts: How many prompts of :data:`FOLLOWING` (1-8).
        lpips_net: LPIPS backbone (``"alex"``, ``"vgg"``) or None for PSNR/SSIM only.
        load: Builds a fresh pipeline (default: the shipped model, :func:`load_shapes_pipeline`).
        progress: A progress bar over the renders.

    Returns:
        ``(result, clips)``: the JSON-ready result (settings, and per arm its clips' checks, means, render time and
        ratio, metrics against the reference, training summary) and each arm's clips (float ``[T, H, W, 3]``).
    """
    import vidsparse
    from vidsparse.pipelines.offline.shapes import load_shapes_pipeline
    from vidsparse.pipelines.training.finetune import load_lora

    from .metrics import compare_frames, get_lpips_metric

    for name, value in (("frames", frames), ("height", height), ("width", width), ("steps", steps)):
        check_int(name, value, minimum=1)
    check_int("prompts", prompts, minimum=1, maximum=len(FOLLOWING))
    check_arms(arms, reference)
    load = load or load_shapes_pipeline
    pipes = {}
    for arm in arms:
        pipe = load()
        pipe.set_progress_bar_config(disable=True)
        if arm.lora is not None:
            load_lora(pipe, arm.lora)
        if arm.method is not None:
            vidsparse.apply(pipe, arm.method)
        pipes[arm.name] = pipe

    clips: dict[str, list[np.ndarray]] = {a.name: [] for a in arms}
    seconds: dict[str, list[float]] = {a.name: [] for a in arms}
    jobs = [(i, arm) for i in range(prompts) for arm in arms]  # arms interleaved per prompt
    from tqdm.auto import tqdm

    for i, arm in tqdm(jobs, desc="arms", disable=not progress):
        _, _, prompt = FOLLOWING[i]
        generator = torch.Generator().manual_seed(SEED + i)
        start = time.perf_counter()
        video = pipes[arm.name](
            prompt,
            generator=generator,
            output_type="np",
            num_frames=frames,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
        ).frames[0]
        seconds[arm.name].append(time.perf_counter() - start)
        clips[arm.name].append(np.asarray(video, dtype=np.float32))

    metric = get_lpips_metric(lpips_net) if lpips_net else None
    ref_s = statistics.median(seconds[reference])
    result: dict[str, Any] = {
        "settings": {
            "frames": frames,
            "height": height,
            "width": width,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "prompts": [FOLLOWING[i][2] for i in range(prompts)],
            "seeds": [SEED + i for i in range(prompts)],
            "reference": reference,
            "lpips_net": lpips_net,
        },
        "arms": {},
    }
    for arm in arms:
        checks = []
        for i, video in enumerate(clips[arm.name]):
            colour, direction, prompt = FOLLOWING[i]
            row = {
                "prompt": prompt,
                **prompt_following(video, colour, direction),
                **temporal_consistency(video, colour),
            }
            if arm.name != reference:
                m = compare_frames(video, clips[reference][i], lpips_metric=metric, names=(arm.name, reference))
                row.update(psnr=m["psnr"], ssim=m["ssim"], lpips=m["lpips"])
            checks.append(row)
        summary: dict[str, Any] = {
            "lora": arm.lora,
            "method": None if arm.method is None else arm.method.to_dict(),
            "follows": sum(r["follows"] for r in checks),
            "visible": sum(r["visible"] for r in checks),
            "clips": len(checks),
            "visible_frames": round(statistics.fmean(r["visible_frames"] for r in checks), 4),
            "mean_frame_change": round(statistics.fmean(r["mean_frame_change"] for r in checks), 5),
            "render_s_median": round(statistics.median(seconds[arm.name]), 3),
            "render_time_vs_reference": round(statistics.median(seconds[arm.name]) / ref_s, 3),
            "training": training_summary(arm.lora),
            "results": checks,
        }
        if arm.name != reference:
            for key in ("psnr", "ssim", "lpips"):
                values = [r[key] for r in checks if r[key] is not None and np.isfinite(r[key])]
                summary[key] = round(statistics.fmean(values), 4) if values else None
        result["arms"][arm.name] = summary
    return result, clips


def side_by_side(clips: dict[str, list[np.ndarray]], prompt_index: int = 0, columns: int = 8) -> np.ndarray:
    """uint8 picture: one row per arm (in order), ``columns`` frames of prompt ``prompt_index``, 2x upscaled."""
    from .frame_grid import frame_grid

    rows = [clips[name][prompt_index] for name in clips]
    return frame_grid([np.repeat(np.repeat(c, 2, axis=1), 2, axis=2) for c in rows], columns=columns)
