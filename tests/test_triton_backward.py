"""The ``triton`` executor's backward: dQ/dK/dV against the ``reference`` executor's autograd.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported), so the shapes stay small: S of 1 to 300 tokens, head dims 16 to 32, blocks of 64 (one case of 128). On a
CUDA machine the same tests run compiled (autotuned tiles).
"""

from __future__ import annotations

import pytest
import torch
from helpers import grads, qkv, random_plan

from vidsparse.kernels.block_sparse_attn import block_sparse_attn, is_interpreted
from vidsparse.kernels.block_sparse_attn_bwd import launch_backward
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.kernels.planning import key_to_query_index
from vidsparse.kernels.reference import reference_attention
from vidsparse.plan import BlockPlan, num_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# float32: both sides compute in fp32 and differ by summation order only. 16-bit: the kernel rounds P and dS to the
# input dtype before its second products (as on tensor cores); the reference keeps fp32 from the rounded inputs.
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-3},
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
}


def assert_same_grads(q, k, v, plan, *, seed, with_lse=False, **masks):
    """The triton executor's outputs and gradients equal the reference's (within the dtype's tolerance)."""
    gen = torch.Generator().manual_seed(seed + 1)
    b, s, h, _ = q.shape
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    dlse = torch.randn(b, h, s, generator=gen).to(DEVICE) if with_lse else None
    ref = grads("reference", q, k, v, plan, dout, dlse, **masks)
    got = grads("triton", q, k, v, plan, dout, dlse, **masks)
    tol = TOL[q.dtype]
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert not torch.isnan(a).any(), name
        if name == "lse":
            assert torch.equal(torch.isneginf(a), torch.isneginf(r))
            a, r = a[torch.isfinite(r)], r[torch.isfinite(r)]
        torch.testing.assert_close(a.float(), r.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    return got


def inputs(b, s, h, d, *, seed, dtype=torch.float32):
    return [x.to(DEVICE) for x in qkv(b, s, h, d, seed=seed, dtype=dtype)]


@pytest.mark.parametrize(
    ("s", "d", "block", "plan_bh", "perm", "padding", "groups", "with_lse"),
    [
        (130, 16, 64, (2, 3), False, False, False, False),  # 2-token tail; per-sample, per-head plan
        (193, 32, 64, (1, 3), True, False, False, True),  # 1-token tail, permuted, the LSE's gradient too
        (256, 16, 64, (1, 1), False, True, False, False),  # S a multiple of the block (masked by padding only)
        (200, 16, 64, (2, 1), True, True, True, True),  # everything: padding, causal groups, permutation
        (300, 16, 128, (1, 3), False, False, True, False),  # block 128, causal groups alone
        (150, 24, 64, (1, 3), False, False, False, True),  # head dim 24, padded to 32 in the kernels
    ],
)
def test_fp32_gradients_match_reference(s, d, block, plan_bh, perm, padding, groups, with_lse):
    b, h = 2, 3
    q, k, v = inputs(b, s, h, d, seed=s)
    plan = random_plan(s, block, b=plan_bh[0], h=plan_bh[1], density=0.5, seed=s, perm=perm).to(DEVICE)
    gen = torch.Generator().manual_seed(s)
    masks = {}
    if padding:  # sample 1 pads every key: all its rows are empty (zeros, no gradient); sample 0 a random fifth
        keep = torch.rand(b, s, generator=gen) > 0.2
        keep[1] = False
        masks["key_padding_mask"] = keep.to(DEVICE)
    if groups:
        masks["causal_groups"] = torch.randint(0, 4, (1, s), generator=gen).to(DEVICE)
    out, lse, dq, dk, dv = assert_same_grads(q, k, v, plan, seed=s, with_lse=with_lse, **masks)
    if padding:
        assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
        assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_match_reference(dtype):
    s = 150
    q, k, v = inputs(2, s, 2, 32, seed=3, dtype=dtype)
    plan = random_plan(s, 64, b=1, h=2, density=0.6, seed=3, perm=True).to(DEVICE)
    keep = (torch.rand(2, s, generator=torch.Generator().manual_seed(3)) > 0.1).to(DEVICE)
    _, _, dq, dk, dv = assert_same_grads(q, k, v, plan, seed=3, with_lse=True, key_padding_mask=keep)
    assert dq.dtype == dk.dtype == dv.dtype == dtype


@pytest.mark.parametrize("s", [1, 64, 65])
def test_one_token_and_single_block_sequences(s):
    """S = 1 (one block of one token), exactly one full block, and one block plus a one-token tail."""
    q, k, v = inputs(1, s, 2, 16, seed=s)
    plan = random_plan(s, 64, b=1, h=2, density=1.0, seed=s).to(DEVICE)
    assert_same_grads(q, k, v, plan, seed=s, with_lse=True)


def test_rows_without_key_blocks_get_zeros_and_pass_no_gradient():
    """A plan row with kv_num = 0 (a key block no query keeps, too): output 0, LSE -inf, dq = 0, dk = dv = 0."""
    s, block, h = 200, 64, 2
    qb = num_blocks(s, block)
    mask = torch.rand(1, h, qb, qb, generator=torch.Generator().manual_seed(4)) < 0.6
    mask[..., 1, :] = False  # query block 1 attends nothing
    mask[..., :, 2] = False  # key block 2 is attended by no query block
    mask[..., 0, 0] = True
    plan = BlockPlan.from_block_mask(mask, block_size=block, seq_len=s).to(DEVICE)
    assert (plan.kv_num[..., 1] == 0).all()
    q, k, v = (x.transpose(1, 2).contiguous().requires_grad_(True) for x in inputs(1, s, h, 16, seed=4))
    out, lse = block_sparse_attn(q, k, v, plan.kv_num, plan.kv_idx, block_size=block)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (out * dout).sum().backward()
    rows, keys = slice(block, 2 * block), slice(2 * block, 3 * block)
    assert (out[:, :, rows] == 0).all() and torch.isneginf(lse[:, :, rows]).all()
    assert (q.grad[:, :, rows] == 0).all()
    assert (k.grad[:, :, keys] == 0).all() and (v.grad[:, :, keys] == 0).all()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    ref_out, _ = reference_attention(*leaves, plan)
    (ref_out * dout).sum().backward()
    for got, ref in zip((q.grad, k.grad, v.grad), leaves, strict=True):
        torch.testing.assert_close(got, ref.grad, **TOL[torch.float32])


@pytest.mark.parametrize("tiles", [(32, 32), (64, 32), (16, 64)])
def test_smaller_tiles_than_the_plan_block(tiles):
    """Several tiles per plan block (what the autotuned GPU configs run): the same gradients as one whole block."""
    s, block, h, d = 150, 64, 2, 16
    plan = random_plan(s, block, b=1, h=h, density=0.6, seed=6).to(DEVICE)
    q, k, v, dout = (x.transpose(1, 2) for x in inputs(1, s, h, d, seed=6) + inputs(1, s, h, d, seed=7)[:1])
    keep = (torch.rand(1, s, generator=torch.Generator().manual_seed(6)) > 0.2).to(DEVICE)
    groups = torch.randint(0, 3, (1, s), generator=torch.Generator().manual_seed(7), dtype=torch.int32).to(DEVICE)
    out, lse = block_sparse_attn(
        q, k, v, plan.kv_num, plan.kv_idx, block_size=block, key_padding_mask=keep, causal_groups=groups
    )
    q_num, q_idx = key_to_query_index(plan)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    args = (dout, dlse, q, k, v, out, lse, plan.kv_num, plan.kv_idx, q_num, q_idx, block, 0.25, keep, groups)
    whole = launch_backward(*args, head_dim_pad=d, interpreted=is_interpreted(), tiles=(block, block))
    split = launch_backward(*args, head_dim_pad=d, interpreted=is_interpreted(), tiles=tiles)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_backward_is_deterministic():
    s = 300
    q, k, v = inputs(2, s, 2, 16, seed=9)
    plan = random_plan(s, 64, b=1, h=2, density=0.5, seed=9, perm=True).to(DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    first = grads("triton", q, k, v, plan, dout)
    second = grads("triton", q, k, v, plan, dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_transposed_plan_is_built_for_training_only_and_cached():
    """Inference never builds the transposed plan; a training call builds it once per plan and reuses it."""
    s = 130
    q, k, v = inputs(1, s, 2, 16, seed=11)
    plan = random_plan(s, 64, b=1, h=2, density=0.5, seed=11).to(DEVICE)
    block_sparse_attention(q, k, v, plan, backend="triton")
    assert "_key_to_query" not in plan.__dict__
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    grads("triton", q, k, v, plan, dout)
    cached = plan.__dict__["_key_to_query"]
    grads("triton", q, k, v, plan, dout)
    assert plan.__dict__["_key_to_query"] is cached
    q_num, q_idx = cached
    mask = plan.block_mask()
    for j in range(plan.num_kv_blocks):  # key block j is listed under exactly the query blocks that keep it
        kept_by = mask[0, 1, :, j].nonzero().flatten().tolist()
        assert q_idx[0, 1, j, : q_num[0, 1, j]].tolist() == kept_by


def test_torch_compile_fullgraph_gives_the_same_gradients():
    s, block = 130, 64
    q, k, v = (x.transpose(1, 2).contiguous() for x in inputs(1, s, 2, 16, seed=12))  # [B, H, S, D], plan order
    plan = random_plan(s, block, b=1, h=2, density=0.5, seed=12).to(DEVICE)
    keep = (torch.rand(1, s, generator=torch.Generator().manual_seed(12)) > 0.1).to(DEVICE)
    q_num, q_idx = key_to_query_index(plan)

    def loss(q, k, v):
        out, lse = block_sparse_attn(
            q, k, v, plan.kv_num, plan.kv_idx, block_size=block, key_padding_mask=keep, q_num=q_num, q_idx=q_idx
        )
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    def run(fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        fn(*leaves).backward()
        return [x.grad for x in leaves]

    eager = run(loss)
    # On CPU inductor's C++ compile costs seconds and adds nothing here: aot_eager still traces the backward graph.
    compiled = run(torch.compile(loss, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager"))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_opcheck_with_autograd():
    """Schema, fake implementations and the autograd registration of the forward and the backward op."""
    s, block, b, h = 70, 64, 2, 2
    plan = random_plan(s, block, b=1, h=h, density=1.0, seed=13).to(DEVICE)
    q_num, q_idx = key_to_query_index(plan)
    q, k, v = (x.transpose(1, 2).contiguous().requires_grad_(True) for x in inputs(b, s, h, 16, seed=13))
    keep = (torch.rand(b, s, generator=torch.Generator().manual_seed(13)) > 0.2).to(DEVICE)
    groups = torch.randint(0, 3, (1, s), generator=torch.Generator().manual_seed(14), dtype=torch.int32).to(DEVICE)
    forward = torch.ops.vidsparse.block_sparse_attn.default
    torch.library.opcheck(forward, (q, k, v, plan.kv_num, plan.kv_idx, block, 0.25, keep, groups, q_num, q_idx))
    torch.library.opcheck(forward, (q, k, v, plan.kv_num, plan.kv_idx, block, 0.25, None))  # transpose derived
    out, lse = forward(*(x.detach() for x in (q, k, v)), plan.kv_num, plan.kv_idx, block, 0.25, keep)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    backward_args = (dout, dlse, q.detach(), k.detach(), v.detach(), out, lse, plan.kv_num, plan.kv_idx)
    torch.library.opcheck(
        torch.ops.vidsparse.block_sparse_attn_backward.default,
        (*backward_args, q_num, q_idx, block, 0.25, keep, groups),
    )


def test_registered_with_a_backward():
    from vidsparse.kernels.registry import get_executor

    spec = get_executor("triton")
    assert spec.has_backward and spec.backward_on("cuda")


def test_transposed_plan_of_the_wrong_shape_is_named():
    s = 130
    q, k, v = (x.transpose(1, 2) for x in inputs(1, s, 1, 16, seed=15))
    plan = random_plan(s, 64, seed=15).to(DEVICE)
    q_num, q_idx = key_to_query_index(plan)
    with pytest.raises(ValueError, match="transposed plan shape"):
        block_sparse_attn(
            q, k, v, plan.kv_num, plan.kv_idx, block_size=64, q_num=q_num[..., :1], q_idx=q_idx[..., :1, :]
        )
    with pytest.raises(ValueError, match="given together"):
        block_sparse_attn(q, k, v, plan.kv_num, plan.kv_idx, block_size=64, q_num=q_num)
