"""vidsparse processors in training: gradients through every family, and what the warm-up rules mean there.

For each family's tiny pipeline the inputs of one real transformer call are captured (a one- or two-step
generation), then the transformer is called in train mode with gradients:

- with the ``dense`` method (a full-density plan through the whole sparse path: hook, processor, planning, executor)
  the loss and the gradient of every parameter equal the stock diffusers processors' (fp32);
- with a sparse plan (``radial``) ``loss.backward()`` works, every parameter the stock model trains gets a finite
  gradient, and the gradients differ from the dense ones (the plan is in the graph, not bypassed);
- a training call is not a denoising step: no counter moves, ``dense_steps`` / ``dense_last_steps`` do not apply,
  ``dense_above_timestep`` decides on the batch's largest timestep, nothing is reused between calls, and planning runs
  without gradients on detached q/k;
- under gradient checkpointing the recomputed blocks plan again and the gradients are unchanged.

The executor is ``reference`` (SDPA with the plan's dense mask: its autograd is the specification), the one executor
with a backward in this tree (``gather`` writes into reused buffers with ``out=``, which autograd refuses);
``VIDSPARSE_TEST_TRAIN_BACKEND`` runs the suite through another one once it has a backward.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

import vidsparse
from vidsparse.methods import get_method
from vidsparse.pipelines.offline import tiny
from vidsparse.pipelines.support import generate, tiny_method_config

BACKEND = os.environ.get("VIDSPARSE_TEST_TRAIN_BACKEND", "reference")

#: One tiny pipeline per family and its generation arguments. Token counts are not multiples of the 64-token block
#: (Wan 5x8x11 = 440); the joint families get two prompts of different lengths (per-sample text padding, batch 2 or
#: 4 with classifier-free guidance); Mochi's scheduler needs two steps.
CASES: dict[str, dict[str, Any]] = {
    "wan": dict(frames=17, height=128, width=176),
    "skyreels_v2": {},
    "cogvideox": {},
    "hunyuan_video": {},
    "hunyuan_video_1.5": {},
    "ltx": {},
    "mochi": dict(steps=2),
}
MIXED = dict(prompt=["a red circle", "a big blue square moves left slowly over the sea"], negative_prompt=["", "dark"])
JOINT = {"cogvideox", "hunyuan_video", "hunyuan_video_1.5", "mochi"}


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, list | tuple):
        return type(x)(_clone(i) for i in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


class Captured:
    """A tiny pipeline's transformer (train mode, every parameter trainable) and the inputs of its first call."""

    def __init__(self, name: str) -> None:
        pipe = tiny.build(name)
        pipe.set_progress_bar_config(disable=True)
        calls: list[tuple[tuple, dict]] = []

        def capture(module, args, kwargs):
            if not calls:
                calls.append((_clone(args), _clone(kwargs)))

        hook = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
        kwargs = dict(steps=1) | CASES[name] | (MIXED if name in JOINT else {})
        generate(pipe, tiny.get_spec(name), **kwargs)
        hook.remove()
        self.transformer = pipe.transformer.train().requires_grad_(True)
        self.args, self.kwargs = calls[0]
        torch.manual_seed(0)
        self.weight = torch.randn_like(self.output(self.kwargs))  # a loss whose gradient is not symmetric

    def output(self, kwargs: dict) -> torch.Tensor:
        out = self.transformer(*self.args, **kwargs)
        return out[0] if isinstance(out, tuple) else out.sample

    def loss(self, **overrides: Any) -> torch.Tensor:
        """A training step's loss: one call in train mode with gradients (``overrides`` replace forward kwargs)."""
        return (self.output(self.kwargs | overrides) * self.weight).sum()

    def gradients(self, **overrides: Any) -> tuple[float, dict[str, torch.Tensor | None]]:
        """Loss and the gradient of every parameter after ``loss.backward()``."""
        self.transformer.zero_grad(set_to_none=True)
        loss = self.loss(**overrides)
        loss.backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in self.transformer.named_parameters()}
        return float(loss.detach()), grads


_captured: dict[str, Captured] = {}


def captured(name: str) -> Captured:
    if name not in _captured:
        _captured[name] = Captured(name)
    return _captured[name]


def assert_same_gradients(got: dict, want: dict, *, rtol: float, atol: float) -> None:
    """Per parameter: ``|g - w| <= atol * (max |w| + 1e-2 * max over all parameters) + rtol * |w|``.

    The floor relative to the largest gradient of the model covers gradients that are zero in exact arithmetic
    (a key projection's bias: softmax ignores a constant added to every score) and are float noise in both runs.
    """
    assert got.keys() == want.keys()
    overall = max(float(w.abs().max()) for w in want.values() if w is not None)
    for name, g in got.items():
        w = want[name]
        assert (g is None) == (w is None), f"{name}: gradient present in one run only"
        if w is not None:
            scale = float(w.abs().max()) + 1e-2 * overall
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}")


def sparse_calls(handle: Any) -> list[dict]:
    return [r for r in handle.stats() if r["sparse"]]


@pytest.mark.parametrize("name", list(CASES))
def test_full_density_gradients_equal_stock(name: str) -> None:
    cap = captured(name)
    stock_loss, stock = cap.gradients()
    assert sum(g is not None for g in stock.values()) > 0
    with vidsparse.apply(cap.transformer, "dense", backend=BACKEND) as handle:
        loss, grads = cap.gradients()
        calls = handle.stats()
    # Every self-attention call went through the sparse path (not the stock fallback), at density 1.
    assert calls and all(r["sparse"] and r["reason"] == "sparse" for r in calls), calls[:3]
    assert loss == pytest.approx(stock_loss, rel=1e-5, abs=1e-5)
    assert_same_gradients(grads, stock, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_plan_backward(name: str) -> None:
    cap = captured(name)
    _, stock = cap.gradients()
    with vidsparse.apply(cap.transformer, tiny_method_config("radial"), backend=BACKEND) as handle:
        _, grads = cap.gradients()
        sparse = sparse_calls(handle)
    assert sparse and min(r["density"] for r in sparse) < 1.0, "the plan must be sparse for this test to mean much"
    assert {n for n, g in grads.items() if g is not None} == {n for n, g in stock.items() if g is not None}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    attention = [n for n in grads if n.endswith("to_q.weight") and grads[n] is not None]
    assert any(not torch.allclose(grads[n], stock[n], rtol=1e-3, atol=1e-6) for n in attention)


def _timestep(cap: Captured, values: list[float]) -> torch.Tensor:
    """A timestep argument with ``values`` repeated over the captured call's batch."""
    ts = cap.kwargs["timestep"]
    batch = ts.shape[0]
    return torch.tensor([values[i % len(values)] for i in range(batch)], dtype=ts.dtype)


def test_training_ignores_step_rules_and_follows_the_timestep_rule() -> None:
    cap = captured("cogvideox")  # batch 4 (two prompts x CFG): mixed timesteps in one batch
    config = tiny_method_config("radial", dense_steps=3, dense_last_steps=1, dense_above_timestep=500.0)
    with vidsparse.apply(cap.transformer, config, backend=BACKEND) as handle:
        handle.set_num_steps(4)  # steps 0-2 dense by dense_steps, step 3 by dense_last_steps: all dense at inference
        above = "dense_above_timestep"
        for values, reason in [([100.0], "sparse"), ([900.0], above), ([100.0, 900.0], above)]:
            handle.clear_stats()
            cap.loss(timestep=_timestep(cap, values)).backward()
            reasons = {r["reason"] for r in handle.stats()}
            assert reasons == {reason}, (values, reasons)
            assert {r["context"] for r in handle.stats()} == {"training"}
        # No training call moved a step counter: the first call of a generation is still step 0 (dense_steps).
        handle.clear_stats()
        with torch.no_grad():  # a pipeline runs under no_grad: a generation, even with the model in train mode
            cap.output(cap.kwargs | {"timestep": _timestep(cap, [100.0])})
        assert {(r["step"], r["reason"]) for r in handle.stats()} == {(0, "dense_steps")}


def test_training_plans_afresh_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    cap = captured("wan")
    module = __import__("vidsparse.methods.cached", fromlist=["METHOD"])
    spec = get_method("cached")
    seen: list[tuple[bool, bool]] = []

    def plan(q, k, layout, config, ctx):
        seen.append((torch.is_grad_enabled(), q.requires_grad or k.requires_grad))
        return spec.plan(q, k, layout, config, ctx)

    monkeypatch.setattr(module, "METHOD", dataclasses.replace(spec, plan=plan))
    with vidsparse.apply(cap.transformer, tiny_method_config("cached"), backend=BACKEND) as handle:
        for _ in range(2):
            cap.loss().backward()
        layers = len(sparse_calls(handle)) // 2
        # Planning ran without autograd on detached q/k; every training call searched its own pattern (a cached
        # method at inference searches once and reuses it), and nothing was stored for later calls.
        assert layers > 0 and seen == [(False, False)] * (2 * layers)
        assert handle.runtime.stores == {} and handle.runtime.shared_stores == {}


def test_gradient_checkpointing_replans_the_same_plan() -> None:
    """Under diffusers' gradient checkpointing the backward re-runs each block: the processor plans again from the
    same q/k (a dynamic method: the same blocks), so the gradients equal those without checkpointing."""
    cap = captured("wan")
    with vidsparse.apply(cap.transformer, tiny_method_config("moba"), backend=BACKEND) as handle:
        loss, plain = cap.gradients()
        calls = len(sparse_calls(handle))
        handle.clear_stats()
        cap.transformer.enable_gradient_checkpointing()
        try:
            ckpt_loss, checkpointed = cap.gradients()
        finally:
            cap.transformer.disable_gradient_checkpointing()
        assert calls > 0 and len(sparse_calls(handle)) == 2 * calls  # forward + recomputation in the backward
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(checkpointed, plain, rtol=1e-3, atol=1e-4)
