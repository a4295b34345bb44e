"""Timing of pipeline runs: end-to-end wall clock, and the share of the transformer's time spent in self-attention.

**End-to-end time** is the wall clock of one ``pipe(...)`` call (text encoding, every denoising step, VAE decode),
with ``torch.cuda.synchronize`` before the clock starts and before it stops on CUDA. The harness runs one warm-up
generation (compiles, caches, allocator) and reports the median of ``repeats`` timed generations.

**Attention share** comes from instrumented generations: on CUDA one extra generation (so the synchronisation it
needs never perturbs the timed ones), on the CPU the timed generations themselves (CPU kernels are synchronous and
the hooks only read a clock). :class:`AttentionTimer` puts forward pre/post hooks on every transformer of the
pipeline and on every video self-attention module the family adapter names (the modules vidsparse would sparsify,
e.g. Wan's ``blocks.*.attn1``), synchronises the device in each hook, and sums the time spent inside each. The share is
``time inside self-attention modules / time inside transformer forwards``: the attention module's whole forward
(q/k/v projections, norms, RoPE, attention, output projection), the same in dense and sparse runs, so the dense
share is an upper bound on what any attention method can save per step. On CUDA the per-call synchronisation adds
a little launch latency to both sides.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from vidsparse.integration import transformers_of


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SpanTimer:
    """Sums the wall time between a module's forward pre-hook and its forward hook (nested calls counted once)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._start = 0.0

    def pre(self, module: torch.nn.Module, args: Any) -> None:
        if self._depth == 0:
            synchronize(self.device)
            self._start = time.perf_counter()
        self._depth += 1

    def post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._start
            self.calls += 1


class AttentionTimer:
    """Context manager timing transformer forwards and their video self-attention modules during one generation.

    Example::

        with AttentionTimer(pipe, device) as timer:
            pipe(prompt, ...)
        timer.result()  # {"transformer_s", "attention_s", "attention_share", "transformer_calls", "attention_calls"}
    """

    def __init__(self, pipe: Any, device: torch.device) -> None:
        from vidsparse.pipelines.registry import adapter_for

        self.transformer_timer = _SpanTimer(device)
        self.attention_timer = _SpanTimer(device)
        self._targets: list[tuple[torch.nn.Module, _SpanTimer]] = []
        for transformer in transformers_of(pipe):
            self._targets.append((transformer, self.transformer_timer))
            adapter = adapter_for(transformer)
            for _, module, _ in adapter.attention_modules(transformer):
                self._targets.append((module, self.attention_timer))
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionTimer:
        for module, timer in self._targets:
            self._handles.append(module.register_forward_pre_hook(timer.pre))
            self._handles.append(module.register_forward_hook(timer.post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self, generations: int = 1) -> dict[str, Any]:
        """Per generation: seconds inside transformer forwards and self-attention modules, their ratio, call counts.

        Args:
            generations: How many generations ran while the timer was active (the sums are divided by it).
        """
        total = self.transformer_timer.seconds / generations
        attention = self.attention_timer.seconds / generations
        return {
            "transformer_s": total,
            "attention_s": attention,
            "attention_share": attention / total if total > 0 else None,
            "transformer_calls": self.transformer_timer.calls // generations,
            "attention_calls": self.attention_timer.calls // generations,
        }
