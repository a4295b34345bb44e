"""``vidsparse bench train``: the time of a LoRA training step, dense vs sparse methods, as ratios from one run.

What a sparse fine-tune saves per step (Radial's and VMoBA's training claims), measured the way every vidsparse
benchmark is: in *interleaved rounds* in one process, so that a shared machine's load changes hit every arm alike.
Each round runs one optimizer step of every arm in turn (``vidsparse finetune``'s own step: the shipped model with
a LoRA, the same procedural clip, noise and timestep for every arm at a given step), timed by the training loop
itself; the first round (kernel builds, static plans, allocator warm-up) is reported apart. Reported per arm: the
median step time, its ratio to the dense arm's (stock attention, ``--method none`` in ``vidsparse finetune``), and
the density the sparse forward measured.

    vidsparse bench train --methods radial:density=0.25 moba:threshold_pool=head --frames 61 --rounds 4

Each arm trains in a folder of its own under a temporary directory that is removed afterwards (nothing the user
wrote is touched); only ``--json`` is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: The dense arm's name: stock attention processors, as ``vidsparse finetune`` without ``--method``.
DENSE = "none"


def bench_train(
    methods: list[str],
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    rounds: int = 4,
    rank: int = 16,
    seed: int = 0,
    device: torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median training-step time of the dense arm and of each method spec, in interleaved rounds.

    Args:
        methods: Method specs (``"radial:density=0.25"``); the dense arm is always measured first in each round.
        frames, height, width: Training clip geometry (default: the shipped model's).
        rounds: Timed rounds after the warm-up round (each: one step of every arm).
        rank: LoRA rank (alpha = rank).
        seed: Data, noise and adapter seed, the same for every arm.
        device: Where to train (default: CPU).
        progress: Called with one line per finished step.

    Returns:
        A JSON-ready dict: ``rows`` (one per arm: ``arm``, ``step_s`` median, ``ratio`` to dense, ``steps_s`` every
        timed step, ``first_step_s``, ``density``), the geometry and the load average before and after.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from vidsparse.methods import parse_method_spec
    from vidsparse.pipelines.offline.shapes import load_shapes_pipeline
    from vidsparse.pipelines.offline.tiny import default_model_name, defaults_for
    from vidsparse.pipelines.training import finetune as F

    if rounds < 1:
        raise ValueError(f"rounds={rounds} is invalid: expected an integer >= 1.")
    device = device or torch.device("cpu")
    shipped = defaults_for(f"tiny-{default_model_name()}")
    geometry = {
        "frames": frames or shipped.frames,
        "height": height or shipped.height,
        "width": width or shipped.width,
    }
    arms: dict[str, Any] = {DENSE: None}
    for spec in methods:
        arms[spec] = F.sparse_training_config(parse_method_spec(spec), None, device)
    for config in arms.values():
        if config is not None:
            F.check_backward(config.backend, device)
    total = rounds + 1  # the warm-up round first
    configs = {
        arm: F.FinetuneConfig(
            sparse=sparse, rank=rank, alpha=float(rank), steps=total, seed=seed, checkpoint_every_s=1e9, **geometry
        )
        for arm, sparse in arms.items()
    }
    F.check_geometry(load_shapes_pipeline(device), configs[DENSE])  # before any training
    load_before = os.getloadavg()
    # Every call loads the model: no loading bars (diffusers' pipeline, transformers' text encoder) between the lines.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="vidsparse-bench-train-") as tmp:
        folders = {arm: Path(tmp) / f"arm{i}" for i, arm in enumerate(arms)}
        for step in range(1, total + 1):
            for arm, config in configs.items():
                # One step per call, resumed from the previous round's checkpoint: the arms alternate step by step.
                # The step time comes from the training loop (model loading and checkpoints are outside it).
                F.finetune(
                    folders[arm],
                    dataclasses.replace(config, steps=step),
                    load_shapes_pipeline(device),
                    resume=step > 1,
                    progress=False,
                )
                if progress is not None:
                    record = _log(folders[arm])[-1]
                    progress(f"bench train: round {step - 1}/{rounds} {arm}: {record['step_s']:.2f} s")
        logs = {arm: _log(folder) for arm, folder in folders.items()}
    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    dense = statistics.median(r["step_s"] for r in logs[DENSE][1:])
    rows = []
    for arm, records in logs.items():
        timed = [r["step_s"] for r in records[1:]]
        densities = [r["density"] for r in records if r.get("density") is not None]
        rows.append(
            {
                "arm": arm,
                "step_s": round(statistics.median(timed), 4),
                "ratio": round(statistics.median(timed) / dense, 3),
                "steps_s": timed,
                "first_step_s": records[0]["step_s"],
                "density": round(statistics.mean(densities), 4) if densities else None,
            }
        )
    return {
        "rows": rows,
        **geometry,
        "rounds": rounds,
        "rank": rank,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _log(folder: Path) -> list[dict[str, Any]]:
    from vidsparse.pipelines.training.finetune import LOG_NAME

    return [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines() if line.strip()]
