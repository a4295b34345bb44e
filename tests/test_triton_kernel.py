"""The Triton block-sparse attention kernel against the reference executor.

On CPU the kernel runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny;
on a CUDA machine the same tests run compiled, plus the larger ``cuda_only`` cases at the end.
"""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidsparse.kernels.block_sparse_attn import _launch, block_sparse_attn
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.kernels.reference import reference_attention
from vidsparse.plan import BlockPlan, num_blocks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs CUDA")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def random_plan(b, h, s, block, *, density=0.5, seed=0, perm=False):
    """A random valid plan [b, h, Qb] (b/h may be 1 = broadcast): each row keeps its own block plus random others."""
    gen = torch.Generator().manual_seed(seed)
    qb = num_blocks(s, block)
    mask = torch.rand(b, h, qb, qb, generator=gen) < density
    mask[..., torch.arange(qb), torch.arange(qb)] = True
    order = torch.randperm(s, generator=gen) if perm else None
    return BlockPlan.from_block_mask(mask, block_size=block, seq_len=s, perm=order).validate().to(DEVICE)


def qkv(b, h, s, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(3)]


def assert_matches_reference(q, k, v, plan, *, dtype=torch.float32, key_padding_mask=None, tiles=None, scale=None):
    d = q.shape[-1]
    scale_value = 1.0 / math.sqrt(d) if scale is None else scale
    if tiles is None:
        out, lse = block_sparse_attn(
            q,
            k,
            v,
            plan.kv_num,
            plan.kv_idx,
            block_size=plan.block_size,
            scale=scale,
            key_padding_mask=key_padding_mask,
        )
    else:
        out, lse = _launch(
            q, k, v, plan.kv_num, plan.kv_idx, plan.block_size, scale_value, key_padding_mask, tiles=tiles
        )
    ref_out, ref_lse = reference_attention(
        q, k, v, plan, scale=scale, return_lse=True, key_padding_mask=key_padding_mask
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    # Empty rows: -inf in both; elsewhere close (the LSE is computed in fp32 from the same inputs: tight).
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-4 if dtype == torch.float32 else 2e-3, rtol=0)
    return out, lse


@pytest.mark.parametrize(
    ("b", "h", "s", "d", "block", "plan_bh", "tiles"),
    [
        (2, 3, 200, 32, 64, (2, 3), None),  # tail block (200 = 3*64 + 8), per-sample and per-head plan
        (2, 2, 150, 16, 128, (1, 1), (64, 32)),  # broadcast plan; a 128 block walked as 64x32 tiles
        (1, 3, 192, 64, 64, (1, 3), (32, 64)),  # S a multiple of the block: the unmasked loop
        (2, 1, 70, 128, 64, (2, 1), None),  # head dim 128; one full block and a 6-token tail
    ],
)
def test_fp32_matches_reference(b, h, s, d, block, plan_bh, tiles):
    plan = random_plan(*plan_bh, s, block, seed=s)
    assert_matches_reference(*qkv(b, h, s, d, seed=d), plan, tiles=tiles)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(dtype):
    plan = random_plan(1, 2, 140, 64, seed=1)
    q, k, v = qkv(2, 2, 140, 32, dtype=dtype)
    assert_matches_reference(q, k, v, plan, dtype=dtype)


def test_rows_with_only_their_own_block():
    s, block = 130, 64
    qb = num_blocks(s, block)
    diag = torch.eye(qb, dtype=torch.bool)
    plan = BlockPlan.from_block_mask(diag, block_size=block, seq_len=s).to(DEVICE)
    assert plan.kv_num.eq(1).all()
    out, _ = assert_matches_reference(*qkv(1, 2, s, 16), plan)
    # Block-diagonal attention is dense attention inside each block: an independent check of the reference too.
    q, k, v = qkv(1, 2, s, 16)
    for i in range(qb):
        sl = slice(i * block, min(s, (i + 1) * block))
        dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl])
        torch.testing.assert_close(out[:, :, sl], dense, atol=1e-4, rtol=1e-4)


def test_full_plan_equals_dense_sdpa():
    q, k, v = qkv(1, 2, 100, 32)
    out, lse = block_sparse_attn(q, k, v, *_full(100, 64), block_size=64)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-4, rtol=1e-4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(32)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-4, rtol=0)


def _full(s, block):
    plan = BlockPlan.full(s, block, device=DEVICE)
    return plan.kv_num, plan.kv_idx


def test_key_padding_mask_and_empty_rows():
    """Padded keys are never attended; a query whose plan blocks are all padded gets 0 and LSE -inf, not NaN."""
    b, h, s, block = 2, 2, 200, 64
    qb = num_blocks(s, block)
    plan = random_plan(1, h, s, block, seed=3)
    gen = torch.Generator().manual_seed(4)
    keep = (torch.rand(b, s, generator=gen) < 0.6).to(DEVICE)
    # Sample 1: only keys of block 0 remain, and the last query block is made to attend only itself: empty row.
    keep[1, block:] = False
    mask = plan.block_mask().expand(1, h, qb, qb).clone()
    mask[:, :, -1] = False
    mask[:, :, -1, -1] = True
    plan = BlockPlan.from_block_mask(mask, block_size=block, seq_len=s)
    out, lse = assert_matches_reference(*qkv(b, h, s, 32), plan, key_padding_mask=keep)
    assert torch.isinf(lse[1, :, -8:]).all() and (lse[1, :, -8:] < 0).all()
    assert out[1, :, -8:].abs().max() == 0


def test_custom_scale():
    plan = random_plan(1, 1, 96, 64, seed=5)
    assert_matches_reference(*qkv(1, 2, 96, 16), plan, scale=0.7)


def test_dispatcher_with_permutation_and_lse():
    """backend='triton' through the public entry: diffusers layout, a permuted plan, LSE returned in original order."""
    b, s, h, d = 2, 150, 2, 16
    plan = random_plan(b, 1, s, 64, seed=6, perm=True)
    q, k, v = (x.transpose(1, 2).contiguous() for x in qkv(b, h, s, d, seed=7))  # [B, S, H, D]
    keep = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    keep[0, -20:] = False
    out, lse = block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True, key_padding_mask=keep)
    ref_out, ref_lse = block_sparse_attention(
        q, k, v, plan, backend="reference", return_lse=True, key_padding_mask=keep
    )
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s=st.integers(1, 200),
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    broadcast_b=st.booleans(),
    broadcast_h=st.booleans(),
    density=st.floats(0.0, 1.0),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_plans(s, b, h, broadcast_b, broadcast_h, density, padded, seed):
    plan = random_plan(1 if broadcast_b else b, 1 if broadcast_h else h, s, 64, density=density, seed=seed)
    keep = None
    if padded:
        keep = (torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) < 0.7).to(DEVICE)
    assert_matches_reference(*qkv(b, h, s, 16, seed=seed), plan, key_padding_mask=keep)


def test_torch_compile_fullgraph():
    """The custom op traces (fake implementation) and runs inside a fullgraph compile."""
    plan = random_plan(1, 1, 130, 64, seed=8)
    q, k, v = qkv(1, 2, 130, 16)

    def attend(q, k, v, kv_num, kv_idx):
        out, lse = block_sparse_attn(q, k, v, kv_num, kv_idx, block_size=64)
        return out * 2.0, lse

    # On CPU inductor's C++ compile costs seconds and adds nothing here: aot_eager still traces with fake tensors.
    compiled = torch.compile(attend, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    got = compiled(q, k, v, plan.kv_num, plan.kv_idx)
    want = attend(q, k, v, plan.kv_num, plan.kv_idx)
    torch.testing.assert_close(got, want)


def test_opcheck_fake_and_schema():
    plan = random_plan(1, 1, 70, 64, seed=9)
    q, k, v = qkv(1, 1, 70, 16)
    keep = torch.ones(1, 70, dtype=torch.bool, device=DEVICE)
    for mask in (None, keep):
        torch.library.opcheck(
            torch.ops.vidsparse.block_sparse_attn.default, (q, k, v, plan.kv_num, plan.kv_idx, 64, 0.25, mask)
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(dtype=torch.float64), "dtypes"),
        (dict(d=300), "head_dim=300"),
        (dict(block=32), "block_size=32"),
        (dict(plan_s=70), "plan shape"),
        (dict(scale=-1.0), "scale=-1.0"),
        (dict(mask=torch.ones(1, 3, dtype=torch.bool)), "key_padding_mask"),
        (dict(idx_dtype=torch.int64), "int32"),
    ],
)
def test_bad_input_is_named(change, message):
    d, s = change.get("d", 16), 130
    q, k, v = (x.to(change.get("dtype", torch.float32)) for x in qkv(1, 1, s, d))
    plan = random_plan(1, 1, change.get("plan_s", s), 64)
    kv_idx = plan.kv_idx.to(change.get("idx_dtype", torch.int32))
    mask = change.get("mask")
    with pytest.raises(ValueError, match=message):
        block_sparse_attn(
            q,
            k,
            v,
            plan.kv_num,
            kv_idx,
            block_size=change.get("block", 64),
            scale=change.get("scale"),
            key_padding_mask=None if mask is None else mask.to(DEVICE),
        )


def test_cpu_without_interpreter_imports_and_refuses_clearly():
    """On a CPU-only machine without TRITON_INTERPRET the module imports, auto picks a CPU executor, and the kernel
    says why it cannot run."""
    code = (
        "import torch\n"
        "from vidsparse.kernels.dispatch import resolve_backend, triton_available\n"
        "from vidsparse.kernels.block_sparse_attn import block_sparse_attn, is_interpreted\n"
        "assert triton_available() and not is_interpreted()\n"
        "assert resolve_backend('auto', torch.device('cpu')) in ('cpp', 'gather')\n"
        "q = torch.randn(1, 1, 64, 16)\n"
        "n, i = torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)\n"
        "try:\n"
        "    block_sparse_attn(q, q, q, n, i, block_size=64)\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------------------------- CUDA only (compiled kernel)
@cuda_only
@pytest.mark.parametrize(("block", "d", "s"), [(64, 128, 4000), (128, 128, 4096), (128, 64, 3001)])
def test_cuda_bf16_autotuned_matches_reference(block, d, s):
    plan = random_plan(1, 4, s, block, density=0.3, seed=block + d)
    assert_matches_reference(*qkv(1, 4, s, d, dtype=torch.bfloat16), plan, dtype=torch.bfloat16)


@cuda_only
def test_cuda_fp32_is_not_tf32():
    """fp32 inputs must not be rounded to TF32 by the tensor cores (atol 1e-4 would fail at D=128)."""
    plan = random_plan(2, 2, 1000, 64, seed=11)
    assert_matches_reference(*qkv(2, 2, 1000, 128), plan)


def test_launch_runs_under_the_tensors_device(monkeypatch):
    """The kernel is launched inside the device guard of q's device (a model on cuda:1 must not launch on cuda:0)."""
    import vidsparse.kernels.block_sparse_attn as bsa

    events = []

    class Guard:
        def __init__(self, device):
            events.append(("guard", device))

        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    real = bsa._block_sparse_attn_fwd

    class Kernel:  # records that the launch happens between enter and exit
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                events.append("launch")
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(bsa, "_device_guard", Guard)
    monkeypatch.setattr(bsa, "_block_sparse_attn_fwd", Kernel())
    q, k, v = qkv(1, 1, 64, 16)
    plan = random_plan(1, 1, 64, 64, density=1.0)
    _launch(q, k, v, plan.kv_num, plan.kv_idx, 64, 0.25, None, tiles=(64, 64))
    assert events == [("guard", q.device), "enter", "launch", "exit"]


def test_device_guard_selects_cuda_devices(monkeypatch):
    import vidsparse.kernels.block_sparse_attn as bsa

    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: seen.append(device) or contextlib.nullcontext())
    with bsa._device_guard(torch.device("cuda", 1)):
        pass
    assert seen == [torch.device("cuda", 1)]
    with bsa._device_guard(torch.device("cpu")):  # no CUDA call for CPU (interpreted) tensors
        pass
    assert seen == [torch.device("cuda", 1)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda n, i: n.view(-1)[1].fill_(i.shape[-1] + 1), "kv_num has values"),
        (lambda n, i: n.view(-1)[0].fill_(-1), "kv_num has values"),
        (lambda n, i: i[0, 0, 1, 0].fill_(3), r"outside \[0, Kb = 3\)"),
        (lambda n, i: i[0, 0, 2, 0].fill_(-2), r"kv_idx\[0, 0, 2, 0\] = -2"),
    ],
)
def test_malformed_plan_raises_clearly(edit, message):
    q, k, v = qkv(1, 1, 150, 16)
    plan = random_plan(1, 1, 150, 64, density=0.5)
    kv_num, kv_idx = plan.kv_num.clone(), plan.kv_idx.clone()
    edit(kv_num, kv_idx)
    with pytest.raises(ValueError, match=message):
        block_sparse_attn(q, k, v, kv_num, kv_idx, block_size=64)


def test_plan_check_runs_once_per_plan_and_again_after_an_edit(monkeypatch):
    import vidsparse.kernels.block_sparse_attn as bsa

    plan = random_plan(1, 2, 150, 64)
    kv_num, kv_idx = plan.kv_num.clone(), plan.kv_idx.clone()
    calls = []
    real_arange = torch.arange
    monkeypatch.setattr(bsa.torch, "arange", lambda *a, **kw: calls.append(1) or real_arange(*a, **kw))
    bsa.check_plan_indices(kv_num, kv_idx, 3)
    bsa.check_plan_indices(kv_num, kv_idx, 3)
    assert len(calls) == 1  # the second call is a cache hit
    padding = kv_idx.shape[-1] - 1
    if kv_num[0, 0, 0] <= padding:  # unused entries are not checked...
        kv_idx[0, 0, 0, padding] = 99
        bsa.check_plan_indices(kv_num, kv_idx, 3)
    kv_idx[0, 0, 0, 0] = 99  # ...but an in-place edit of a used one is seen
    with pytest.raises(ValueError, match="kv_idx"):
        bsa.check_plan_indices(kv_num, kv_idx, 3)


def test_small_tiles_for_fp32_head_dim_128():
    """fp32 at D=128 needs a small tile among the autotune configs; the kernel is exact with it."""
    import vidsparse.kernels.block_sparse_attn as bsa

    configs = bsa._prune_configs(bsa._cuda_configs(), {"PLAN_BLOCK": 64})
    assert (32, 64) in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs}
    q, k, v = qkv(1, 1, 100, 128)
    assert_matches_reference(q, k, v, random_plan(1, 1, 100, 64), tiles=(32, 64))


@pytest.mark.parametrize(("d", "s", "tiles"), [(80, 100, None), (96, 64, (32, 64)), (160, 70, None), (24, 40, None)])
def test_head_dims_padded_to_a_power_of_two(d, s, tiles):
    """Head dims outside 16/32/64/128 run padded to the next power of two, with the reference's results."""
    import vidsparse.kernels.block_sparse_attn as bsa

    assert bsa.padded_head_dim(d) == {80: 128, 96: 128, 160: 256, 24: 32}[d]
    q, k, v = qkv(1, 2, s, d)
    out, _ = assert_matches_reference(q, k, v, random_plan(1, 2, s, 64), tiles=tiles)
    assert out.shape[-1] == d


def test_padded_head_dim_prunes_large_tiles():
    import vidsparse.kernels.block_sparse_attn as bsa

    kept = bsa._prune_configs(bsa._cuda_configs(), {"PLAN_BLOCK": 128, "HEAD_DIM_PAD": 256})
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)
    assert len(bsa._prune_configs(bsa._cuda_configs(), {"PLAN_BLOCK": 128, "HEAD_DIM_PAD": 128})) > len(kept)


def test_strided_views_and_tail_only_masking():
    """Transposed [B, S, H, D] views (what the dispatcher passes, no copies) and a partial last block masked alone."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 200, 2, 32, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    for plan in (random_plan(1, 2, 200, 64), random_plan(1, 2, 200, 128, density=1.0)):  # 200 = 3*64 + 8
        assert_matches_reference(q, k, v, plan)
        assert_matches_reference(q, k, v, plan, tiles=(32, 32))  # several tiles per block, only one crosses S
