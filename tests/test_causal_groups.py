"""Block-causal model masks (``causal_groups``) ANDed with plans, in every executor.

The reference executor is checked against an explicit masked softmax; flex and the Triton kernel (interpreted on
CPU) against the reference, with and without a permutation and a key padding mask. The block-level part
(:func:`vidsparse.kernels.masks.restrict_to_causal_groups`) must drop exactly the block pairs the mask hides.
"""

import pytest
import torch
from helpers import cpu_executors, qkv, random_plan

from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.kernels.masks import block_min_max, fully_visible_pairs, restrict_to_causal_groups

# 300 tokens = 4 full blocks of 64 and a partial one; "frames" of 45 tokens in causal blocks of 2 frames (90 tokens):
# group boundaries fall inside plan blocks, so the per-token mask matters.
B, S, H, D = 2, 300, 2, 16
GROUPS = (torch.arange(S) // 45 // 2)[None]


def explicit(q, k, v, plan, groups, keep=None):
    """Masked softmax attention written out: plan mask AND groups (AND key padding)."""
    mask = plan.to_dense_mask() & (groups[:, None, None, :] <= groups[:, None, :, None])
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def test_reference_matches_explicit_masked_softmax():
    q, k, v = qkv(B, S, H, D, seed=1)
    plan = random_plan(S, 64, density=0.6, seed=1)
    out = block_sparse_attention(q, k, v, plan, backend="reference", causal_groups=GROUPS)
    torch.testing.assert_close(out, explicit(q, k, v, plan, GROUPS), atol=1e-5, rtol=1e-5)
    assert (out - block_sparse_attention(q, k, v, plan, backend="reference")).abs().max() > 1e-3


BACKENDS = cpu_executors(interpreted=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("perm", [False, True])
def test_fast_executors_match_reference(backend, perm):
    q, k, v = qkv(B, S, H, D, seed=2)
    plan = random_plan(S, 64, density=0.6, seed=3, perm=perm)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, 270:] = False
    for groups, padding in ((GROUPS, None), (GROUPS.expand(B, -1), keep)):
        ref = block_sparse_attention(q, k, v, plan, backend="reference", causal_groups=groups, key_padding_mask=padding)
        out = block_sparse_attention(q, k, v, plan, backend=backend, causal_groups=groups, key_padding_mask=padding)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_restrict_drops_exactly_the_hidden_block_pairs():
    plan = random_plan(S, 64, density=1.0, seed=4)
    restricted = restrict_to_causal_groups(plan, GROUPS).validate()
    # Block i's queries reach key block j iff some key of j is in a group <= some query's group of i.
    blocks = torch.arange(S) // 64
    token_ok = GROUPS[0][None, :] <= GROUPS[0][:, None]
    counts = torch.zeros(5, 5, dtype=torch.long)
    counts.index_put_((blocks[:, None].expand(S, S), blocks[None, :].expand(S, S)), token_ok.long(), accumulate=True)
    reachable = counts > 0
    assert torch.equal(restricted.block_mask()[0, 0], reachable)
    assert restricted.density() < plan.density()
    # Fully visible pairs (no token hidden) are a subset of the reachable ones; the diagonal is never fully visible
    # when a group boundary crosses the block.
    visible = fully_visible_pairs(plan, None, GROUPS)[0, 0]
    assert not (visible & ~reachable).any() and visible[0, 0] and not visible[1, 1]


@pytest.mark.parametrize("seed", range(4))
def test_restrict_on_index_lists_equals_the_block_mask_and(seed):
    """Per-head sparse plans, one or two group rows: the same pairs as ANDing the dense block masks, rows trimmed."""
    plan = random_plan(S, 64, b=1 + seed % 2, h=2, density=0.5, seed=10 + seed)
    other = (torch.arange(S) // 30 // (1 + seed))[None]
    groups = torch.cat([GROUPS, other]) if seed % 2 == 0 else GROUPS
    restricted = restrict_to_causal_groups(plan, groups).validate()
    gmin, gmax = block_min_max(groups, 64)
    expected = plan.block_mask() & (gmin[:, None, None, :] <= gmax[:, None, :, None])
    assert torch.equal(restricted.block_mask(), expected)
    assert restricted.kv_idx.shape[-1] == int(restricted.kv_num.max())


def test_bad_causal_groups_are_named():
    q, k, v = qkv(1, S, H, D)
    plan = random_plan(S, 64, seed=5)
    with pytest.raises(ValueError, match="causal_groups must be"):
        block_sparse_attention(q, k, v, plan, backend="reference", causal_groups=GROUPS[:, :10])
    with pytest.raises(ValueError, match="causal_groups must hold integers"):
        block_sparse_attention(q, k, v, plan, backend="reference", causal_groups=GROUPS.float())
