"""Planning helpers: the Triton kernels (interpreted on CPU) against the torch versions, and torch against loops."""

import pytest
import torch

from vidsparse.kernels.planning import block_mask_to_lut, block_means, block_sums
from vidsparse.plan import BlockPlan, block_mask_to_indices

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def naive_block_means(x, group):
    s = x.shape[-2]
    return torch.stack([x[..., i : i + group, :].float().mean(-2) for i in range(0, s, group)], dim=-2)


@pytest.mark.parametrize(
    ("shape", "group", "dtype"),
    [
        ((2, 3, 200, 32), 64, torch.float32),  # partial last block (8 tokens)
        ((1, 2, 256, 16), 128, torch.float32),  # exact blocks
        ((1, 2, 130, 24), 64, torch.bfloat16),  # head dim not a power of two, bf16
        ((3, 45, 16), 10, torch.float16),  # a pooled-region size (not a power of two), 3-D input
    ],
)
def test_block_means_triton_equals_torch_equals_loop(shape, group, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=DEVICE, dtype=dtype)
    by_torch = block_means(x, group, backend="torch")
    by_triton = block_means(x, group, backend="triton")
    assert by_torch.dtype == by_triton.dtype == torch.float32
    assert by_torch.shape == (*shape[:-2], -(-shape[-2] // group), shape[-1])
    torch.testing.assert_close(by_torch, naive_block_means(x, group), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_triton, by_torch, atol=1e-5, rtol=1e-5)


def test_block_means_auto_and_non_contiguous():
    x = torch.randn(1, 100, 2, 16, device=DEVICE).transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] tensor
    want = naive_block_means(x, 64)
    torch.testing.assert_close(block_means(x, 64), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_means(x, 64, backend="triton"), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sums_along_any_dim_equal_a_loop(tokens, dtype):
    """Draft's region sums ([B, N, H, D], dim=1) and the means' sums ([..., S, D]) are one function."""
    x = torch.randn(2, tokens, 3, 5).to(dtype)
    group = 16
    expected = torch.stack(
        [x[:, i : i + group].float().sum(1) for i in range(0, tokens, group)], dim=1
    )  # [B, ceil(N / group), H, D]
    got = block_sums(x, group, dim=1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block_sums(x.transpose(1, 2), group), expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 3, 1100), (1, 2, 4, 1)])
def test_lut_triton_equals_torch(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[0, 0, 0] = False  # an empty row
    mask = mask.to(DEVICE)
    num_t, idx_t = block_mask_to_lut(mask, backend="triton")
    num_r, idx_r = block_mask_to_indices(mask)
    assert num_t.dtype == idx_t.dtype == torch.int32
    assert torch.equal(num_t, num_r) and torch.equal(idx_t, idx_r)
    assert num_t[0, 0, 0] == 0


def test_lut_round_trips_through_blockplan():
    qb = 9
    mask = torch.rand(2, 2, qb, qb, generator=torch.Generator().manual_seed(2)) < 0.4
    mask[..., torch.arange(qb), torch.arange(qb)] = True
    kv_num, kv_idx = block_mask_to_lut(mask.to(DEVICE), backend="triton")
    plan = BlockPlan(kv_num, kv_idx, 64, qb * 64 - 5).validate()
    assert torch.equal(plan.block_mask().cpu(), mask)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: block_means(torch.zeros(4, 8), 0), "block_size=0"),
        (lambda: block_means(torch.zeros(4, 8), 4, backend="cuda"), "backend='cuda'"),
        (lambda: block_means(torch.zeros(8), 4), r"\[..., S, D\]"),
        (lambda: block_mask_to_lut(torch.zeros(2, 3, 3)), "bool"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
