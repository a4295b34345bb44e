import pytest
import torch
from helpers import qkv, random_plan
from hypothesis import given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse.kernels import block_sparse_attention
from vidsparse.plan import BlockPlan

# Fixed shapes: flex compiles once per shape (tests vary plan *data*, never shapes, to stay fast).
B, S, H, D = 2, 300, 3, 16


def test_reference_full_plan_equals_sdpa():
    q, k, v = qkv(B, S, H, D)
    out = block_sparse_attention(q, k, v, BlockPlan.full(S, 64), backend="reference")
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def test_reference_matches_explicit_masked_softmax():
    q, k, v = qkv(1, 130, 1, 8, seed=1)
    plan = random_plan(130, 64, density=0.3, seed=2)
    mask = plan.to_dense_mask()[0, 0]
    scores = (q[0, :, 0] @ k[0, :, 0].T) / 8**0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    expected = probs @ v[0, :, 0]
    out, lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True)
    torch.testing.assert_close(out[0, :, 0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    density=st.floats(0.0, 1.0),
    per_head=st.booleans(),
    perm=st.booleans(),
    block_size=st.sampled_from([64, 128]),
)
def test_flex_matches_reference_on_random_plans(seed, density, per_head, perm, block_size):
    q, k, v = qkv(B, S, H, D, seed=seed)
    plan = random_plan(
        S, block_size, b=B if per_head else 1, h=H if per_head else 1, density=density, seed=seed, perm=perm
    ).validate()
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    out = block_sparse_attention(q, k, v, plan, backend="flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_key_padding_mask_is_anded():
    q, k, v = qkv(B, S, H, D, seed=5)
    plan = random_plan(S, 64, density=0.5, seed=5)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 250:] = False  # padded keys of sample 0 (like padded text)
    keep[1, 290:] = False
    ref = block_sparse_attention(q, k, v, plan, backend="reference", key_padding_mask=keep)
    out = block_sparse_attention(q, k, v, plan, backend="flex", key_padding_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and the padding really changed the result
    assert (ref - block_sparse_attention(q, k, v, plan, backend="reference")).abs().max() > 1e-3


def test_flex_lse_on_cpu_falls_back_with_warning():
    q, k, v = qkv(B, S, H, D, seed=6)
    plan = random_plan(S, 64, density=0.5, seed=6, perm=True)
    _, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True)
    _, lse = block_sparse_attention(q, k, v, plan, backend="flex", return_lse=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_flex_does_not_recompile_for_new_plan_data():
    from torch._dynamo.utils import counters

    q, k, v = qkv(B, S, H, D, seed=7)
    block_sparse_attention(q, k, v, random_plan(S, 64, density=0.2, seed=0), backend="flex")  # compiled (maybe)
    before = counters["stats"]["unique_graphs"]
    for seed in range(1, 5):
        block_sparse_attention(q, k, v, random_plan(S, 64, density=0.2 * seed, seed=seed), backend="flex")
    assert counters["stats"]["unique_graphs"] == before


def test_bf16_flex_close_to_fp32_reference():
    q, k, v = qkv(B, S, H, D, seed=8)
    plan = random_plan(S, 64, density=0.4, seed=8)
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    out = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, backend="flex")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_public_attention_and_errors():
    q, k, v = qkv(1, 100, 2, 8)
    plan = BlockPlan.full(100, 64)
    out = vidsparse.attention(q, k, v, plan, backend="reference")
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="seq_len=100"):
        vidsparse.attention(q[:, :90], k[:, :90], v[:, :90], plan, backend="reference")
    with pytest.raises(ValueError, match="backend='cuda'"):
        vidsparse.attention(q, k, v, plan, backend="cuda")
    bad = random_plan(100, 64, b=3, seed=1)
    with pytest.raises(ValueError, match="broadcast"):
        vidsparse.attention(q, k, v, bad, backend="reference")


def test_flex_never_falls_back_to_eager_after_many_shapes():
    """Dynamo runs a function eagerly once its recompile limit is hit, and eager FlexAttention ignores the block
    lists (dense result). The flex executor raises the limit for its own calls: with a global limit of 1, a second
    shape must still be computed sparse, not silently dense."""
    with torch._dynamo.config.patch(recompile_limit=1):
        for seq_len in (130, 194):  # two new shapes: the second would exceed a limit of 1
            q, k, v = qkv(1, seq_len, 1, 16, seed=seq_len)
            plan = random_plan(seq_len, 64, density=0.3, seed=seq_len)
            ref = block_sparse_attention(q, k, v, plan, backend="reference")
            out = block_sparse_attention(q, k, v, plan, backend="flex")
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
