"""The ``cpp`` executor's own backward checks (both kernel paths, determinism, compile, opcheck); the gradient matrix
of every executor against the reference is tests/test_gradients.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_grads, grads, has_cxx_compiler, qkv, random_plan

from vidsparse.kernels.cpp import HAS_BACKWARD, cpp_block_sparse_attention

pytestmark = pytest.mark.skipif(not has_cxx_compiler(), reason="no C++ compiler: the cpp kernel cannot be built")


def test_marked_as_having_a_backward():
    assert HAS_BACKWARD is True


@pytest.mark.parametrize("threads", [1, 4])
def test_both_kernel_paths_match_reference(threads):
    """One (batch, head) pair: with 1 thread the kernel's one-pass-per-head path, with 4 its two-pass path."""
    s = 257
    q, k, v = qkv(1, s, 1, 16, seed=11)
    plan = random_plan(s, 64, b=1, h=1, density=0.5, seed=11, perm=True)
    keep = torch.rand(1, s, generator=torch.Generator().manual_seed(11)) > 0.2
    groups = torch.randint(0, 3, (1, s), generator=torch.Generator().manual_seed(12))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_same_grads("cpp", q, k, v, plan, seed=11, with_lse=True, key_padding_mask=keep, causal_groups=groups)
    finally:
        torch.set_num_threads(before)


def test_empty_rows_get_zero_gradient():
    """Queries of a batch whose keys are all padded see nothing: zero output, zero dq, and their k/v get none."""
    s = 130
    q, k, v = qkv(2, s, 2, 8, seed=3)
    plan = random_plan(s, 64, b=1, h=1, density=0.5, seed=3, perm=False)
    keep = torch.ones(2, s, dtype=torch.bool)
    keep[1] = False
    out, lse, dq, dk, dv = grads("cpp", q, k, v, plan, torch.randn(q.shape), key_padding_mask=keep)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert dq[0].abs().sum() > 0 and dk[0].abs().sum() > 0 and dv[0].abs().sum() > 0


def test_backward_is_deterministic():
    s = 700
    q, k, v = qkv(2, s, 2, 32, seed=5)
    plan = random_plan(s, 64, b=1, h=2, density=0.4, seed=5, perm=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    first = grads("cpp", q, k, v, plan, dout)
    second = grads("cpp", q, k, v, plan, dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_gives_the_same_gradients():
    s, block = 200, 64
    q, k, v = (x.transpose(1, 2).contiguous() for x in qkv(1, s, 2, 16, seed=7))  # [B, H, S, D], plan order
    plan = random_plan(s, block, b=1, h=2, density=0.5, seed=7, perm=False)
    keep = torch.rand(1, s, generator=torch.Generator().manual_seed(7)) > 0.1

    def loss(q, k, v):
        out, lse = cpp_block_sparse_attention(q, k, v, plan, return_lse=True, key_padding_mask=keep)
        return (out * out).sum() + lse.sum()

    def run(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        fn(*leaves).backward()
        return [x.grad for x in leaves]

    eager = run(loss)
    compiled = run(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_opcheck():
    from vidsparse.kernels.cpp import _attention_op, _rows
    from vidsparse.kernels.planning import key_to_query_index

    s, block, b, h = 130, 64, 2, 2
    q, k, v = (x.transpose(1, 2).contiguous().requires_grad_(True) for x in qkv(b, s, h, 8, seed=9))
    plan = random_plan(s, block, b=1, h=h, density=0.6, seed=9, perm=False)
    q_num, q_idx = key_to_query_index(plan)
    keep = torch.rand(b, s, generator=torch.Generator().manual_seed(9)) > 0.2
    groups = torch.randint(0, 3, (b, s), generator=torch.Generator().manual_seed(10), dtype=torch.int32)
    args = (q, k, v, *(_rows(x, b, h) for x in (plan.kv_num, plan.kv_idx, q_num, q_idx)), keep, groups, block, 0.3)
    torch.library.opcheck(_attention_op, args)
