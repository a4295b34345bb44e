"""Gradients through block-sparse attention, for every executor that has a backward on this machine.

The reference executor is checked by ``torch.autograd.gradcheck`` in float64 (it is the oracle: its gradients are
torch's autograd of a masked softmax); every other executor's dQ/dK/dV against the reference's, over random plans
with tail blocks, empty rows, per-head plans, permutations, key padding, causal groups, batch 2, float32 and bf16.
Executors without a backward (from the registry) are refused with a clear error, and ``auto`` never picks one when
gradients are needed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_same_grads, cpu_executors, grads, qkv, random_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidsparse.kernels import registry
from vidsparse.kernels.dispatch import block_sparse_attention, resolve_backend

CPU = torch.device("cpu")


def backward_executors(dtype: torch.dtype) -> list[str]:
    """The CPU executors (other than the reference) whose backward runs on the CPU and that compute ``dtype``."""
    return [name for name in cpu_executors(dtype=dtype) if registry.get_executor(name).backward_on("cpu")]


def test_every_cpu_executor_but_flex_has_a_backward():
    """A guard on the matrix below: it must not shrink silently (flex compiles no backward on CPU)."""
    assert set(backward_executors(torch.float32)) >= {"gather"} and "flex" not in backward_executors(torch.float32)
    assert "gather" in backward_executors(torch.bfloat16)


@pytest.mark.parametrize("masks", ["none", "padding", "groups"])
def test_reference_gradcheck_float64(masks):
    s, block = 70, 64  # a full block and a 6-token tail
    q, k, v = (x.double().requires_grad_(True) for x in qkv(2, s, 2, 4, seed=1))
    plan = random_plan(s, block, b=2, h=1, density=0.5, seed=1, perm=True)
    extra = {}
    if masks == "padding":
        keep = torch.ones(2, s, dtype=torch.bool)
        keep[0, 50:] = False
        keep[1] = False  # every key of batch 1 padded: empty rows, zero output and zero gradients
        extra["key_padding_mask"] = keep
    if masks == "groups":
        extra["causal_groups"] = torch.randint(0, 3, (1, s), generator=torch.Generator().manual_seed(2))

    def attention(q, k, v):
        return block_sparse_attention(q, k, v, plan, backend="reference", **extra)

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-5)


def test_reference_empty_rows_have_zero_not_nan_gradients():
    s = 130
    q, k, v = qkv(1, s, 1, 8, seed=3)
    plan = random_plan(s, 64, density=0.5, seed=3)
    keep = torch.zeros(1, s, dtype=torch.bool)
    keep[0, :10] = True  # only the first 10 keys exist: queries whose plan keeps no block holding them see nothing
    out, lse, dq, dk, dv = grads("reference", q, k, v, plan, torch.randn(q.shape), key_padding_mask=keep)
    assert torch.isneginf(lse).any(), "the case needs queries that see no key"
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dk[0, 10:] == 0).all() and (dv[0, 10:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s=st.sampled_from([64, 65, 130, 191]),  # one full block; tails of 1, 2 and 63 tokens
    block=st.sampled_from([64, 128]),
    plan_b=st.sampled_from([1, 2]),
    plan_h=st.sampled_from([1, 3]),
    density=st.floats(0.0, 1.0),  # 0: only the own blocks
    perm=st.booleans(),
    padding=st.booleans(),
    groups=st.booleans(),
    with_lse=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_gradients_match_reference(dtype, s, block, plan_b, plan_h, density, perm, padding, groups, with_lse, seed):
    b, h, d = 2, 3, 16
    q, k, v = qkv(b, s, h, d, seed=seed, dtype=dtype)
    plan = random_plan(s, block, b=plan_b, h=plan_h, density=density, seed=seed, perm=perm)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    if padding:  # batch 1 pads every key: its rows are empty (zeros, no gradient); batch 0 pads a random fifth
        keep = torch.rand(b, s, generator=gen) > 0.2
        keep[1] = False
        masks["key_padding_mask"] = keep
    if groups:
        masks["causal_groups"] = torch.randint(0, 4, (1, s), generator=gen)
    for backend in backward_executors(dtype):
        assert_same_grads(backend, q, k, v, plan, seed=seed, with_lse=with_lse, **masks)


def test_gather_gradients_with_its_fast_path_off_match_the_fast_forward():
    """With gradients gather gathers afresh and skips its split windows: the output must not change."""
    s = 700  # enough blocks for split windows
    q, k, v = qkv(1, s, 2, 16, seed=4)
    plan = random_plan(s, 64, h=2, density=0.4, seed=4, perm=True)
    with torch.no_grad():
        fast = block_sparse_attention(q, k, v, plan, backend="gather")
    slow = block_sparse_attention(*(x.clone().requires_grad_(True) for x in (q, k, v)), plan, backend="gather")
    torch.testing.assert_close(slow.detach(), fast, atol=1e-5, rtol=1e-5)


def test_an_executor_without_backward_is_refused_when_gradients_are_needed():
    q, k, v = (x.requires_grad_(True) for x in qkv(1, 130, 1, 8, seed=5))
    plan = random_plan(130, 64, density=0.5, seed=5)
    with pytest.raises(ValueError, match=r"backend='flex' has no backward on cpu.*'reference'"):
        block_sparse_attention(q, k, v, plan, backend="flex")


def test_auto_picks_an_executor_with_a_backward(monkeypatch):
    cpu_first = next(e for e in registry.executors() if e.runs_on("cpu") and e.available())
    assert resolve_backend("auto", CPU, torch.float32) == cpu_first.name
    # The preferred CPU executor loses its backward: auto must skip it for training, and only for training.
    forward_only = dataclasses.replace(cpu_first, has_backward=False)
    real_get = registry.get_executor
    monkeypatch.setattr(registry, "get_executor", lambda n: forward_only if n == cpu_first.name else real_get(n))
    picked = resolve_backend("auto", CPU, torch.float32, needs_grad=True)
    assert picked != cpu_first.name and registry.get_executor(picked).backward_on("cpu")
    assert resolve_backend("auto", CPU, torch.float32) == cpu_first.name


def test_auto_through_the_dispatcher_trains():
    """``block_sparse_attention(..., backend="auto")`` on inputs that need gradients gives the reference's gradients."""
    q, k, v = qkv(1, 191, 2, 16, seed=6, dtype=torch.bfloat16)
    plan = random_plan(191, 64, h=2, density=0.5, seed=6, perm=True)
    assert_same_grads("auto", q, k, v, plan, seed=6)
