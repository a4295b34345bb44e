import pytest
import torch
from helpers import random_plan

from vidsparse import BlockPlan, VideoLayout
from vidsparse.plan import block_mask_to_indices, finalize_plan, num_blocks


def test_from_block_mask_round_trip():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 5, generator=gen) < 0.5
    mask[..., torch.arange(5), torch.arange(5)] = True
    plan = BlockPlan.from_block_mask(mask, block_size=64, seq_len=300).validate()
    assert torch.equal(plan.block_mask(), mask)
    kv_num, kv_idx = block_mask_to_indices(mask)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                expected = torch.nonzero(mask[b, h, i]).flatten().tolist()
                assert kv_idx[b, h, i, : kv_num[b, h, i]].tolist() == expected


def test_dense_mask_expands_blocks_and_tail():
    mask = torch.tensor([[True, False, False], [False, True, True], [True, False, True]])
    plan = BlockPlan.from_block_mask(mask, block_size=64, seq_len=150)
    dense = plan.to_dense_mask()[0, 0]
    assert dense.shape == (150, 150)
    assert dense[0, 0] and not dense[0, 64] and not dense[70, 10] and dense[70, 140] and dense[149, 0]
    # density counts block pairs: 5 of 9
    assert plan.density() == pytest.approx(5 / 9)


def test_permutation_round_trip_in_dense_mask():
    plan = random_plan(200, 64, perm=True, seed=3)
    inv = plan.inv_perm
    assert torch.equal(plan.perm[inv], torch.arange(200))
    plan_order = plan.to_dense_mask(original_order=False)[0, 0]
    original = plan.to_dense_mask(original_order=True)[0, 0]
    # token perm[p] (original) sits at plan position p
    assert torch.equal(original[plan.perm][:, plan.perm], plan_order)


@pytest.mark.parametrize(
    "kv_num, kv_idx, message",
    [
        ([[[1, 1]]], [[[[1, 0], [1, 0]]]], "own block"),
        ([[[2, 1]]], [[[[1, 0], [1, 0]]]], "sorted"),
        ([[[1, 1]]], [[[[0, 0], [5, 0]]]], "outside"),
        ([[[0, 1]]], [[[[0, 0], [1, 0]]]], "kv_num"),
    ],
)
def test_validate_names_broken_invariant(kv_num, kv_idx, message):
    plan = BlockPlan(torch.tensor(kv_num, dtype=torch.int32), torch.tensor(kv_idx, dtype=torch.int32), 64, 100)
    with pytest.raises(ValueError, match=message):
        plan.validate()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="query blocks"):
        BlockPlan(torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 64, 500)
    with pytest.raises(ValueError, match="block_size=32"):
        BlockPlan.full(100, 32)


@pytest.mark.parametrize("position", ["before", "after"])
def test_finalize_plan_keeps_text_dense_and_reorders(position):
    layout = VideoLayout(frames=3, height=5, width=7, text_len=20, text_position=position)  # 105 video + 20 text
    vb = num_blocks(layout.num_video_tokens, 64)
    video_mask = torch.zeros(1, 1, vb, vb, dtype=torch.bool)  # the method keeps nothing: only invariants remain
    plan = finalize_plan(video_mask, layout, 64).validate()
    dense = plan.to_dense_mask()[0, 0]
    text = torch.arange(20) if position == "before" else torch.arange(105, 125)
    assert dense[text].all() and dense[:, text].all()  # text rows and columns dense
    assert dense.diagonal().all()  # every token sees its own block
    if position == "before":
        assert plan.perm is not None and plan.perm[:105].min() == 20  # video first in plan order
    else:
        assert plan.perm is None


def test_tile_order_is_a_permutation_with_ragged_edges():
    layout = VideoLayout(frames=5, height=7, width=9)
    order = layout.tile_order((2, 4, 4))
    assert torch.equal(order.sort().values, torch.arange(layout.num_video_tokens))
    coords = layout.token_coords()[order]
    # the first tile is t<2, h<4, w<4 : 32 tokens
    first = coords[:32]
    assert (first[:, 0] < 2).all() and (first[:, 1] < 4).all() and (first[:, 2] < 4).all()


def test_layout_validation():
    with pytest.raises(ValueError, match="frames=0"):
        VideoLayout(frames=0, height=2, width=2)
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout(frames=1, height=2, width=2, text_position="middle")


def test_plan_index_width_is_the_longest_row():
    """kv_idx holds Kmax = max(kv_num) columns, not Kb: memory follows the density (issue 27 item 10)."""
    mask = torch.eye(10, dtype=torch.bool)
    mask[3, :4] = True  # the longest row keeps 4 blocks
    plan = BlockPlan.from_block_mask(mask, block_size=64, seq_len=600).validate()
    assert plan.kv_idx.shape[-1] == 4 and int(plan.kv_num.max()) == 4
    assert torch.equal(plan.block_mask()[0, 0], mask)
    assert plan.to_block_mask().kv_indices.shape[-1] == 10  # flex's copy stays full width (no recompiles)
