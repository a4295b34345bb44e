"""The dense-vs-sparse harness: every (prompt, seed) rendered densely once and once per method configuration.

A sweep is a flat list of independent :class:`EvalJob` s (:func:`plan_jobs`): for each prompt × seed, the dense
reference (stock diffusers attention) and one job per method configuration, all with the same seed, schedule and
shapes. :class:`Runner` executes one job and writes its result file atomically (``runs/<run_id>.json``, see
:mod:`vidsparse.eval.results`); a sparse job that finds no dense reference computes it first, so any subset of jobs
can run in any order, in any process. The report (:mod:`vidsparse.eval.report`) is then built from whatever run
files exist.

Per run the harness records: end-to-end time (one warm-up generation, then the median of ``repeats``), the
attention share of the transformer time (an instrumented extra generation, :mod:`vidsparse.eval.timing`), the
measured density and planning time (``handle.summary()`` / ``handle.stats()``), and for sparse runs PSNR / SSIM /
LPIPS against the dense reference's decoded frames (at uint8 levels, as saved), plus a side-by-side clip
dense | sparse | |difference|×k.

Run identity: ``run_id`` hashes (model, model seed, prompt, seed, geometry, steps, guidance, dtype, device type,
the full method config), so a resumed or extended sweep with the same arguments finds its finished runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.config import SparseConfig
from vidsparse.integration import apply
from vidsparse.methods import parse_method_spec
from vidsparse.video_io import to_uint8_frames, write_video

from .out_dir import record as record_files
from .results import (
    CLIPS_DIR,
    REFS_DIR,
    RUN_SCHEMA,
    RUN_SCHEMA_VERSION,
    environment,
    load_run,
    run_path,
    write_json_atomic,
    write_npy_atomic,
)
from .specs import MethodRun
from .timing import AttentionTimer, synchronize

#: Built-in prompts of ``vidsparse eval`` (``--prompts FILE`` replaces them): simple scenes the embedded models know.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red circle moves left",
    "a blue square moves down",
)
#: Gain applied to |dense - sparse| in the difference panel of side-by-side clips.
DEFAULT_DIFF_GAIN = 4.0
#: Side-by-side gifs (the HTML report shows these) are downscaled to at most this height in pixels.
GIF_MAX_HEIGHT = 160


@dataclass(frozen=True)
class EvalJob:
    """One generation to run and measure.

    Attributes:
        model: ``--model`` (``tiny-<name>``, hub id or folder).
        model_seed: Seed of the tiny pipelines' weights (ignored by real checkpoints).
        prompt: Text prompt.
        seed: Generator seed of the denoising noise.
        frames, height, width: Clip geometry in pixels / frames.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale.
        dtype: Torch dtype name of the pipeline (``"float32"``, ``"bfloat16"``, ...).
        device_type: ``"cpu"`` or ``"cuda"`` (the dense reference differs between them).
        method: Canonical method spec (:func:`~vidsparse.eval.specs.canonical_spec`); ``None`` for the dense
            reference (stock attention).
        note: Why ``--densities`` did not apply to this method (reports print it); not part of the identity.
        lora: A LoRA folder loaded into the model (``--lora``), or ``None``.
        lora_digest: SHA-256 (first 12 hex digits) of its weights file: a retrained LoRA in the same folder is a
            new model, so its runs get new ids.
    """

    model: str
    model_seed: int
    prompt: str
    seed: int
    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    dtype: str
    device_type: str
    method: str | None = None
    note: str | None = None
    lora: str | None = None
    lora_digest: str | None = None

    @property
    def is_dense(self) -> bool:
        """True for the dense reference run."""
        return self.method is None

    def config(self) -> SparseConfig | None:
        """The method config (None for the dense reference)."""
        return None if self.method is None else parse_method_spec(self.method)

    def reference(self) -> EvalJob:
        """The dense reference job of this job's (prompt, seed, geometry, steps, model)."""
        return dataclasses.replace(self, method=None, note=None)

    def identity(self) -> dict[str, Any]:
        """What defines the run (everything but the note); the method as its full config dict."""
        fields = dataclasses.asdict(self)
        fields.pop("note")
        if self.lora is None:  # runs without a LoRA keep the ids they had before the field existed
            fields.pop("lora"), fields.pop("lora_digest")
        config = self.config()
        fields["method"] = None if config is None else config.to_dict()
        return fields

    @property
    def ref_id(self) -> str:
        """Id of the dense reference this job is compared against."""
        return "ref-" + _digest(self.reference().identity())

    @property
    def run_id(self) -> str:
        """Stable id of this run: ``ref-<hash>`` for the reference, ``<method>-<hash>`` otherwise."""
        if self.is_dense:
            return self.ref_id
        return f"{self.method.partition(':')[0]}-{_digest(self.identity())}"

    @property
    def label(self) -> str:
        """Short human label: the method spec, or ``dense reference`` (stock attention)."""
        return "dense reference" if self.is_dense else self.method


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Geometry:
    """The shared render settings of a sweep: frames, height, width, steps, guidance scale."""

    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float


def plan_jobs(
    *,
    model: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[MethodRun],
    geometry: Geometry,
    dtype: str,
    device_type: str,
    model_seed: int = 0,
    lora: str | None = None,
    lora_digest: str | None = None,
) -> list[EvalJob]:
    """The sweep's jobs: per prompt × seed the dense reference first, then one job per method configuration.

    ``lora`` / ``lora_digest``: the LoRA every job loads into the model (see :class:`EvalJob`).
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (--prompts FILE holds one per line).")
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed.")
    jobs = []
    for prompt in prompts:
        for seed in seeds:
            base = EvalJob(
                model=model,
                model_seed=model_seed,
                prompt=prompt,
                seed=int(seed),
                frames=geometry.frames,
                height=geometry.height,
                width=geometry.width,
                steps=geometry.steps,
                guidance_scale=float(geometry.guidance_scale),
                dtype=dtype,
                device_type=device_type,
                lora=lora,
                lora_digest=lora_digest,
            )
            jobs.append(base)
            jobs.extend(dataclasses.replace(base, method=m.spec, note=m.note) for m in methods)
    return jobs


def side_by_side(dense: np.ndarray, sparse: np.ndarray, gain: float = DEFAULT_DIFF_GAIN) -> np.ndarray:
    """Frames ``dense | sparse | min(1, |dense - sparse| * gain)`` next to each other.

    Args:
        dense, sparse: float ``[T, H, W, 3]`` in [0, 1].
        gain: Amplification of the difference panel.

    Returns:
        float32 ``[T, H, 3W, 3]`` in [0, 1].
    """
    diff = np.clip(np.abs(dense.astype(np.float32) - sparse.astype(np.float32)) * gain, 0.0, 1.0)
    return np.concatenate([dense, sparse, diff], axis=2).astype(np.float32)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _error_record(err: BaseException) -> dict[str, str]:
    return {
        "type": type(err).__name__,
        "message": str(err),
        "traceback": "".join(traceback.format_exception(err))[-4000:],
    }


class Runner:
    """Runs :class:`EvalJob` s on one device and writes their result files into ``out_dir``.

    Args:
        out_dir: The eval directory.
        device: Torch device of the pipeline.
        repeats: Timed generations per run after the warm-up (their median is the end-to-end time).
        fps: Frame rate of written clips.
        diff_gain: Gain of the difference panel of side-by-side clips.
        lpips_net: ``"alex"``, ``"vgg"`` or ``None`` (no LPIPS).
        lpips_weights: Explicit LPIPS backbone weights file (else the metrics module's resolution chain).
        lpips_metric: A ready LPIPS metric (or ``LpipsUnavailable``) to use instead of resolving one (tests inject
            a random-backbone metric here).
        command: The command line recorded in every result file.
        progress: Show the denoising-step progress bar of each generation.
        load_pipeline: ``load_pipeline(job) -> pipeline`` (default: :func:`vidsparse.pipelines.loading.load_pipeline`
            on ``device`` in the job's dtype); the last pipeline is reused while jobs share model and dtype.
        process: ``(index, count)`` of this process in a sweep shared by several (recorded in every run file).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        device: torch.device,
        repeats: int = 1,
        fps: int = 8,
        diff_gain: float = DEFAULT_DIFF_GAIN,
        lpips_net: str | None = "alex",
        lpips_weights: str | None = None,
        lpips_metric: Any = None,
        command: str = "",
        progress: bool = True,
        load_pipeline: Callable[[EvalJob], Any] | None = None,
        process: tuple[int, int] = (0, 1),
    ) -> None:
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats={repeats!r} is invalid: expected an integer >= 1.")
        if not (isinstance(diff_gain, int | float) and math.isfinite(diff_gain) and diff_gain > 0):
            raise ValueError(f"diff_gain={diff_gain!r} is invalid: expected a positive number.")
        self.out_dir = Path(out_dir)
        self.device = device
        self.repeats = repeats
        self.fps = fps
        self.diff_gain = float(diff_gain)
        self.lpips_net = lpips_net
        self.lpips_weights = lpips_weights
        if lpips_metric is None and lpips_net is None:
            from .lpips_weights import LpipsUnavailable

            lpips_metric = LpipsUnavailable("none", "LPIPS disabled (--lpips none)", "pass --lpips alex or vgg")
        self.lpips_metric = lpips_metric
        #: Run ids executed by this runner (a reference rendered on demand is not rendered again by the sweep).
        self.done: set[str] = set()
        self.command = command
        self.progress = progress
        self._load = load_pipeline or self._default_load
        self.process = {"index": process[0], "count": process[1]}
        self._pipe_key: tuple | None = None
        self._pipe: Any = None
        self._env: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- plumbing
    def _default_load(self, job: EvalJob) -> Any:
        from vidsparse.pipelines.loading import DTYPES, load_pipeline

        pipe, _ = load_pipeline(
            job.model, device=self.device, dtype=DTYPES[job.dtype], seed=job.model_seed, lora=job.lora
        )
        return pipe

    def pipeline(self, job: EvalJob) -> Any:
        """The pipeline of ``job`` (loaded once per model / weights seed / dtype / LoRA)."""
        key = (job.model, job.model_seed, job.dtype, job.lora, job.lora_digest)
        if key != self._pipe_key:
            self._pipe = None  # free the previous one first
            self._pipe = self._load(job)
            self._pipe_key = key
        return self._pipe

    def env(self) -> dict[str, Any]:
        """Versions and device (computed once)."""
        if self._env is None:
            self._env = environment(self.device)
        return self._env

    def _generate(self, pipe: Any, job: EvalJob, desc: str) -> tuple[np.ndarray, float]:
        """One generation of ``job``: frames ``[T, H, W, 3]`` (float32 in [0, 1] at uint8 levels), wall time (s)."""
        pipe.set_progress_bar_config(desc=desc, leave=False, disable=not self.progress)
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        synchronize(self.device)
        start = time.perf_counter()
        result = pipe(
            prompt=job.prompt,
            num_frames=job.frames,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            generator=generator,
            output_type="np",
        )
        synchronize(self.device)
        seconds = time.perf_counter() - start
        # Measure the frames as a user gets them from `vidsparse render` (uint8, as in any saved clip), so a
        # `vidsparse compare` of two rendered `.npy` clips gives exactly the numbers recorded here.
        frames = to_uint8_frames(result.frames[0]).astype(np.float32) / 255.0
        return frames, seconds

    def _measure(self, pipe: Any, job: EvalJob, handle: Any = None) -> tuple[np.ndarray, dict, list[dict]]:
        """Warm-up, ``repeats`` timed generations, and the attention-share measurement.

        On CUDA the attention share comes from one extra instrumented generation (its per-module synchronisation
        would perturb the timed ones); on the CPU, where kernels run synchronously and the hooks cost only a clock
        read, the timed generations themselves are instrumented.

        Returns:
            ``(frames of the first timed generation, timing dict, handle summaries of the timed generations)``.
        """
        label = job.label
        _, warmup_s = self._generate(pipe, job, f"{label} warm-up")
        separate_profile = self.device.type == "cuda"
        timer = AttentionTimer(pipe, self.device)
        times, summaries = [], []
        frames = None
        max_diff = 0.0
        load_before = _load_average()
        for index in range(self.repeats):
            if handle is not None:
                handle.clear_stats()
            if separate_profile:
                out, seconds = self._generate(pipe, job, f"{label} {index + 1}/{self.repeats}")
            else:
                with timer:
                    out, seconds = self._generate(pipe, job, f"{label} {index + 1}/{self.repeats}")
            times.append(seconds)
            if handle is not None:
                summaries.append(_sparse_stats(handle))
            if frames is None:
                frames = out
            else:
                max_diff = max(max_diff, float(np.abs(out - frames).max()))
        load_after = _load_average()
        if separate_profile:
            with timer:
                self._generate(pipe, job, f"{label} profile")
        timing = {
            "warmup_s": warmup_s,
            "e2e_s": times,
            "e2e_median_s": statistics.median(times),
            "repeats": self.repeats,
            "repeat_max_abs_diff": max_diff,
            "attention_share_from": "extra instrumented generation" if separate_profile else "timed generations",
            "load_average": [load_before, load_after],
            **timer.result(generations=1 if separate_profile else self.repeats),
        }
        return frames, timing, summaries

    # --------------------------------------------------------------------------------------------- the runs
    def run(self, job: EvalJob) -> dict[str, Any]:
        """Run ``job`` and write ``runs/<run_id>.json`` atomically; a failure is recorded, never raised.

        ``KeyboardInterrupt`` (and other non-``Exception`` s) propagate without writing anything, so an
        interrupted run is simply redone by ``--resume``.
        """
        started, t0 = _now(), time.perf_counter()
        record: dict[str, Any] = {
            "schema": RUN_SCHEMA,
            "schema_version": RUN_SCHEMA_VERSION,
            "run_id": job.run_id,
            "ref_id": job.ref_id,
            "kind": "dense" if job.is_dense else "sparse",
            "job": dataclasses.asdict(job),
            "config": None if job.is_dense else job.config().to_dict(),
            "command": self.command,
            "process": self.process,
            "started_at": started,
        }
        try:
            record["env"] = self.env()
            record.update(self._run_dense(job) if job.is_dense else self._run_sparse(job))
            record["status"] = "ok"
        except Exception as err:  # a failing method is a result: recorded, and the sweep goes on
            record["status"] = "failed"
            record["error"] = _error_record(err)
        record["finished_at"] = _now()
        record["wall_s"] = time.perf_counter() - t0
        record_files(self.out_dir, [write_json_atomic(run_path(self.out_dir, job.run_id), record)])
        self.done.add(job.run_id)
        return record

    def _ref_paths(self, ref_id: str) -> tuple[Path, Path]:
        folder = Path(REFS_DIR) / ref_id
        return folder / "frames.npy", folder / "dense.mp4"

    def _run_dense(self, job: EvalJob) -> dict[str, Any]:
        pipe = self.pipeline(job)
        frames, timing, _ = self._measure(pipe, job)
        frames_rel, clip_rel = self._ref_paths(job.ref_id)
        record_files(self.out_dir, [write_npy_atomic(self.out_dir / frames_rel, frames)])
        artifacts = {"frames": str(frames_rel)}
        if _even(frames):
            record_files(self.out_dir, [write_video(self.out_dir / clip_rel, frames, fps=self.fps)])
            artifacts["clip"] = str(clip_rel)
        return {"timing": timing, "artifacts": artifacts, "shape": list(frames.shape)}

    def reference_frames(self, job: EvalJob) -> np.ndarray:
        """The dense reference frames of ``job`` (rendering and recording the reference run first when absent).

        Raises:
            RuntimeError: the reference run failed (its error is in its own run file).
        """
        record, _ = load_run(self.out_dir, job.ref_id)
        if record is None:
            record = self.run(job.reference())
        if record["status"] != "ok":
            error = record.get("error", {})
            raise RuntimeError(
                f"the dense reference {job.ref_id} failed ({error.get('type')}: {error.get('message')}); "
                "no comparison is possible"
            )
        return np.load(self.out_dir / record["artifacts"]["frames"], allow_pickle=False)

    def _run_sparse(self, job: EvalJob) -> dict[str, Any]:
        from vidsparse.eval.metrics import compare_frames

        dense = self.reference_frames(job)
        pipe = self.pipeline(job)
        handle = apply(pipe, job.config())
        try:
            frames, timing, summaries = self._measure(pipe, job, handle)
        finally:
            handle.remove()
        if frames.shape != dense.shape:
            raise RuntimeError(f"sparse frames have shape {frames.shape}, the dense reference {dense.shape}")
        metrics = compare_frames(
            dense,
            frames,
            net=self.lpips_net or "alex",
            lpips_weights=self.lpips_weights,
            lpips_metric=self.lpips_metric,
            device=self.device,
        )
        clip = side_by_side(dense, frames, self.diff_gain)
        artifacts = {}
        if _even(clip):
            artifacts["side_by_side_mp4"] = str(Path(CLIPS_DIR) / f"{job.run_id}.mp4")
            record_files(self.out_dir, [write_video(self.out_dir / artifacts["side_by_side_mp4"], clip, fps=self.fps)])
        stride = max(1, math.ceil(clip.shape[1] / GIF_MAX_HEIGHT))
        artifacts["side_by_side_gif"] = str(Path(CLIPS_DIR) / f"{job.run_id}.gif")
        gif = write_video(self.out_dir / artifacts["side_by_side_gif"], clip[:, ::stride, ::stride], fps=self.fps)
        record_files(self.out_dir, [gif])
        return {
            "timing": timing,
            "sparsity": _combine_stats(summaries),
            "metrics": metrics,
            "artifacts": artifacts,
            "shape": list(frames.shape),
            "diff_gain": self.diff_gain,
        }


def _load_average() -> float | None:
    """The 1-minute system load average (None where the OS has none): a busy machine makes timings noisy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _even(frames: np.ndarray) -> bool:
    """mp4 needs even frame sizes."""
    return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0


def _sparse_stats(handle: Any) -> dict[str, Any]:
    """One generation's ``handle.summary()`` plus dense-call reasons and per-call planning time."""
    rows = handle.stats()
    summary = dict(handle.summary())
    summary["dense_reasons"] = dict(Counter(r["reason"] for r in rows if not r["sparse"]))
    summary["plan_ms_per_call"] = summary["plan_ms"] / summary["sparse_calls"] if summary["sparse_calls"] else None
    summary["tokens"] = max((r["tokens"] for r in rows), default=0)
    return summary


def _combine_stats(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The timed generations' statistics: counts and densities of the first (they repeat), median planning time."""
    combined = dict(summaries[0])
    combined["plan_ms"] = statistics.median(s["plan_ms"] for s in summaries)
    per_call = [s["plan_ms_per_call"] for s in summaries if s["plan_ms_per_call"] is not None]
    combined["plan_ms_per_call"] = statistics.median(per_call) if per_call else None
    combined["generations"] = len(summaries)
    return combined


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: run ids executed, skipped (already complete) and failed."""

    executed: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)


def run_sweep(jobs: Sequence[EvalJob], runner: Runner, *, resume: bool = False, progress: bool = True) -> SweepResult:
    """Run the jobs in order with a progress bar over runs; with ``resume``, skip those already complete.

    A job is complete when its run file validates with status ``ok`` (:func:`~vidsparse.eval.results.load_run`);
    failed runs are retried by ``resume``. Without ``resume`` every job runs and overwrites its run file, except a
    dense reference this runner already rendered on demand for a sparse job.
    """
    from tqdm.auto import tqdm

    result = SweepResult()
    bar = tqdm(jobs, desc="eval runs", unit="run", disable=not progress)
    for job in bar:
        bar.set_postfix_str(f"{job.label} | {job.prompt[:24]} | seed {job.seed}")
        if job.run_id in runner.done:
            result.skipped.append(job.run_id)
            continue
        if resume:
            record, _ = load_run(runner.out_dir, job.run_id)
            if record is not None and record["status"] == "ok":
                result.skipped.append(job.run_id)
                continue
        record = runner.run(job)
        result.executed.append(job.run_id)
        if record["status"] != "ok":
            result.failed.append(job.run_id)
            error = record["error"]
            bar.write(f"run {job.run_id} ({job.label}) failed: {error['type']}: {error['message']}")
    return result
