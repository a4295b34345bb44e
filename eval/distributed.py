"""Eval sweeps across processes, GPUs and machines: ``accelerate launch -m vidsparse eval`` or ``--num-processes N``.

A sweep is a list of independent jobs (:func:`vidsparse.eval.harness.plan_jobs`) whose results are atomic per-run
files, and the report is rebuilt from whatever run files exist; so a sweep splits across processes without any
exchange of results:

1. every process plans the same job list from the same arguments;
2. :func:`shard_jobs` deals out whole *reference groups* (a dense reference and every job compared with it), so no
   reference is rendered twice and a sparse run always finds its reference in its own process; the deal depends on
   the job list only (never on files already there, which other processes are writing meanwhile);
3. each process runs its share on its own device (``cuda:<local rank>``) and writes its run files atomically;
4. the main process waits for the others (:meth:`SweepProcesses.wait_for_everyone`) and builds the one report.

The processes talk only to meet at the barriers, through gloo (a CPU process group) whatever the device: no GPU
memory goes to NCCL communicators. With several machines the output directory must be one shared file system.

``accelerate launch --num_processes N`` (accelerate 1.15, no config file) starts N processes with ``--multi_gpu``,
CPU-only machines included (it starts them with torchrun); with ``--cpu`` instead it starts a single process
(accelerate's multi-CPU mode goes through ``mpirun``). ``vidsparse eval --num-processes N`` starts the right command
itself (:func:`launch_command`); plain ``torchrun --nproc_per_node N -m vidsparse eval ...`` works too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .harness import EvalJob

#: How long a process waits at a barrier for the others (they may be rendering a long share of the sweep).
DEFAULT_TIMEOUT_S = 24 * 3600


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE`` of torchrun / accelerate launch; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class SweepProcesses:
    """Where this process stands in a multi-process sweep, and the barrier (accelerate's ``PartialState``, gloo).

    Attributes:
        index: Global process index (0 is the main process: it prepares the output directory and builds the
            report).
        count: Number of processes.
        local_index: Index on this machine (picks the GPU).
    """

    index: int
    count: int
    local_index: int
    _state: Any = None

    @classmethod
    def start(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> SweepProcesses:
        """Join the launcher's processes (or stand alone when there is one process)."""
        if launched_world_size() == 1:
            return cls(0, 1, 0)
        from accelerate import PartialState

        state = PartialState(cpu=True, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(state.process_index, state.num_processes, state.local_process_index, state)

    @property
    def is_main(self) -> bool:
        """True on the main process."""
        return self.index == 0

    def wait_for_everyone(self) -> None:
        """Barrier: return when every process got here (no-op for one process)."""
        if self._state is not None:
            self._state.wait_for_everyone()

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda`` without an index becomes ``cuda:<local index>``."""
        if device.type == "cuda" and device.index is None and self.count > 1:
            return torch.device("cuda", self.local_index % max(1, torch.cuda.device_count()))
        return device


def shard_jobs(jobs: Sequence[EvalJob], index: int, count: int) -> list[EvalJob]:
    """The jobs of process ``index`` out of ``count``: whole reference groups, balanced by job count.

    Groups (jobs sharing a ``ref_id``, the dense reference included) go, largest first and then in plan order, to
    the process with the fewest jobs so far (lowest index on ties). The result keeps plan order. Every process
    computes the same deal from the same job list.

    Args:
        jobs: The sweep (:func:`~vidsparse.eval.harness.plan_jobs`).
        index: This process, ``0 <= index < count``.
        count: Number of processes, >= 1.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r} is invalid: expected an integer >= 1.")
    if not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"index={index!r} is invalid: expected an integer in [0, {count}).")
    sizes = Counter(job.ref_id for job in jobs)  # in plan order
    load = [0] * count
    owner: dict[str, int] = {}
    for ref_id in sorted(sizes, key=lambda r: -sizes[r]):  # a stable sort: plan order among equal sizes
        target = min(range(count), key=lambda p: (load[p], p))
        owner[ref_id] = target
        load[target] += sizes[ref_id]
    return [job for job in jobs if owner[job.ref_id] == index]


def forwarded_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, drop: Sequence[str]) -> list[str]:
    """Command-line arguments that reproduce ``args`` (options left at their defaults are left out).

    Args:
        parser: The parser that produced ``args``.
        args: The parsed arguments.
        drop: Destinations not to forward (e.g. ``num_processes`` itself).
    """
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value == action.default:
            continue
        option = max(action.option_strings, key=len)  # the long form
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(option)
            continue
        values = value if isinstance(value, list | tuple) else [value]
        argv += [option, *(repr(v) if isinstance(v, float) else str(v) for v in values)]
    return argv


def launch_command(num_processes: int, eval_arguments: Sequence[str]) -> list[str]:
    """The ``accelerate launch`` command that runs ``vidsparse eval <eval_arguments>`` in ``num_processes`` processes.

    ``--multi_gpu`` is accelerate's torchrun launcher: N processes on this machine, CPU-only machines included
    (``--cpu`` alone would start one process); ``--main_process_port 0`` picks a free port, so several sweeps can
    run on one machine.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        "0",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "vidsparse",
        "eval",
        *eval_arguments,
    ]
