"""Block-sparse flash attention (forward) over a BlockPlan index list, in Triton.

This is the ``triton`` executor of :mod:`vidsparse.kernels`, the fast path on CUDA. It is the flash-attention forward
of Dao et al. (*FlashAttention*, 2022; *FlashAttention-2*, 2023) as the Triton fused-attention tutorial writes it,
with one change: instead of walking every key tile of the sequence, each query tile walks only the key blocks its
plan row lists (the "index list" design of MInference and FastVideo's VSA, see ``research/peers.md`` §2).

The plan is FlexAttention's layout (:class:`vidsparse.plan.BlockPlan`)::

    kv_num[b, h, i]          how many key blocks query block i attends            int32 [B, H, Qb]
    kv_idx[b, h, i, :kv_num] which ones, ascending                                 int32 [B, H, Qb, Kmax]

so the work of a query tile is proportional to ``kv_num``: at density d the kernel does about d of the dense FLOPs.

How one program works (grid = query tiles x batch*heads)::

    q tile (BLOCK_M x D) stays in registers
    for j in range(kv_num[b, h, row]):                    <- the sparse loop: only listed blocks are read
        for each BLOCK_N slice of key block kv_idx[b, h, row, j]:
            s = q @ k^T                                   (fp32 accumulate)
            online softmax update in base 2: m (row max), l (row sum), acc (fp32 output)
    out = acc / l ; lse = (m + log2 l) * ln 2             (natural log, for merging partial attentions)

Details that matter, each explained where it happens below: base-2 exponentials, the plan's broadcast batch/head
dimensions (stride 0), the partial last block (S need not be a multiple of the block size), the optional key padding
mask and block-causal groups (model masks ANDed with the plan), and the empty-row rule (a row with no valid key
gives output 0 and LSE -inf, never NaN).

The public entry :func:`block_sparse_attn` is a torch custom op (``torch.ops.vidsparse.block_sparse_attn``) with a
fake implementation, so ``torch.compile(fullgraph=True)`` traces through it. Its backward, registered with
``torch.library.register_autograd``, is the FlashAttention-2 backward of :mod:`vidsparse.kernels.block_sparse_attn_bwd`
(itself the op ``vidsparse::block_sparse_attn_backward``): scores recomputed from the LSE the forward returns, a dQ
pass over the plan rows and a dK/dV pass over the plan transposed, deterministic (no atomics).

On a machine without CUDA the same kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton
is imported; ``tests/conftest.py`` does it): slowly, on CPU tensors, which is how the test suite checks it against the
``reference`` executor.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from vidsparse.config import SUPPORTED_BLOCK_SIZES, check_choice
from vidsparse.plan import BlockPlan, num_blocks

from .block_sparse_attn_bwd import launch_backward

__all__ = [
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "block_sparse_attn",
    "check_plan_indices",
    "is_interpreted",
]

#: Head dimensions the kernel runs without padding (tl.arange needs a power of two, tl.dot at least 16).
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128)
#: Largest head dimension; others (80, 96, 160, ...) are padded to the next power of two with masked loads, the way
#: FlexAttention does: the padded columns load as 0, so they add nothing to q.k and are never stored.
MAX_HEAD_DIM = 256


def padded_head_dim(d: int) -> int:
    """The power of two >= max(d, 16) the kernel computes with for head dimension ``d``."""
    return max(16, 1 << (d - 1).bit_length())


#: Input dtypes; the output has the input's dtype, softmax statistics and accumulator are always float32.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))


@triton.jit
def _attend_key_tile(
    acc,
    l_i,
    m_i,
    q,
    q_groups,
    k_base,
    v_base,
    key_mask_base,
    groups_base,
    start_n,
    seq_len,
    qk_scale,
    stride_ks,
    stride_vs,
    offs_n,
    offs_d,
    d_ok,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    PAD_D: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """One step of the online softmax: fold keys [start_n, start_n + BLOCK_N) into (acc, l_i, m_i)."""
    cols = start_n + offs_n
    # K is loaded transposed (D x BLOCK_N) straight from memory, so q @ k needs no register shuffle.
    if MASK_KEYS:
        in_seq = cols < seq_len
        k_ok = in_seq[None, :] & d_ok[:, None]  # d_ok is all True unless the head dim is padded
        v_ok = in_seq[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=k_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=v_ok, other=0.0)
    elif PAD_D:
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    if DOT_IN_FP32:
        # Interpreter only: it stores bfloat16 as raw uint16 and its tl.dot would multiply the bit patterns
        # (triton-lang/triton#11584). bf16 products are exact in fp32, so the result matches the GPU's.
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    if MASK_KEYS:
        # Keys past the end of the sequence (partial last block) and padded keys get -inf before the max, so they
        # neither raise the running max nor add to the sum.
        valid = in_seq
        if HAS_KEY_MASK:
            valid = valid & (tl.load(key_mask_base + cols, mask=in_seq, other=0) != 0)
        if HAS_GROUPS:
            # Block-causal model mask: a key is visible when its group is not later than the query's.
            k_groups = tl.load(groups_base + cols, mask=in_seq, other=0)
            qk = tl.where(valid[None, :] & (k_groups[None, :] <= q_groups[:, None]), qk, float("-inf"))
        else:
            qk = tl.where(valid[None, :], qk, float("-inf"))
    # Base 2 throughout: exp2 is the native instruction, and the softmax scale folds into one fused multiply-add
    # (qk * qk_scale - m) instead of scaling q in its 16-bit dtype, which would add a rounding.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row whose keys so far are all masked has m_new = -inf, and -inf - (-inf) is NaN. Subtracting 0 instead keeps
    # p = exp2(-inf) = 0 and alpha = 0: the row simply stays empty.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # P is rounded to V's dtype so the second product also runs on 16-bit tensor cores (fp32 stays fp32).
    p = p.to(v.dtype)
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _block_sparse_attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    KvNum,
    KvIdx,
    KeyMask,
    Groups,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_nb,
    stride_nh,
    stride_nq,
    stride_ib,
    stride_ih,
    stride_iq,
    stride_ik,
    stride_mb,
    stride_gb,
    num_heads,
    seq_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PLAN_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    TAIL_ONLY: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head), over the key blocks of their plan row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)  # int64: B*H*S*D can pass 2**31 on long videos
    off_h = (pid_bh % num_heads).to(tl.int64)
    # A query tile never straddles two plan rows: BLOCK_M divides PLAN_BLOCK (checked by the launcher).
    plan_row = (pid_m * BLOCK_M) // PLAN_BLOCK

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM  # constant True (folded away) when HEAD_DIM is a power of two
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    key_mask_base = KeyMask + off_b * stride_mb
    groups_base = Groups + off_b * stride_gb

    q_rows = offs_m < seq_len
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_rows[:, None] & d_ok[None, :], other=0.0)
    if HAS_GROUPS:
        q_groups = tl.load(groups_base + offs_m, mask=q_rows, other=0)
    else:
        q_groups = offs_m  # never read

    # The plan's batch/head dimensions may be 1 (one pattern for all heads): the launcher passes stride 0 for them,
    # so the same index row is read by every (b, h) without materialising copies.
    n_kv = tl.load(KvNum + off_b * stride_nb + off_h * stride_nh + plan_row * stride_nq)
    idx_row = KvIdx + off_b * stride_ib + off_h * stride_ih + plan_row * stride_iq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # 0, not the tutorial's 1: an empty row must be recognisable
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # MASK_KEYS is False when S is a multiple of the block and no padding mask is given: the loop body is then the
    # dense tutorial's, without any compare/select.
    for j in range(0, n_kv):
        kv_block = tl.load(idx_row + j * stride_ik)
        # A plan block of 128 keys may be walked as two 64-key tiles (smaller tiles, fewer registers).
        for sub in tl.static_range(PLAN_BLOCK // BLOCK_N):
            start_n = kv_block * PLAN_BLOCK + sub * BLOCK_N
            # Only the tile that crosses the end of the sequence needs the bounds mask (TAIL_ONLY: no padding mask
            # or groups); every other tile runs the unmasked body.
            if TAIL_ONLY:
                if start_n + BLOCK_N > seq_len:
                    acc, l_i, m_i = _attend_key_tile(
                        acc,
                        l_i,
                        m_i,
                        q,
                        q_groups,
                        k_base,
                        v_base,
                        key_mask_base,
                        groups_base,
                        start_n,
                        seq_len,
                        qk_scale,
                        stride_ks,
                        stride_vs,
                        offs_n,
                        offs_d,
                        d_ok,
                        BLOCK_N,
                        True,
                        HEAD_DIM != HEAD_DIM_PAD,
                        HAS_KEY_MASK,
                        HAS_GROUPS,
                        DOT_PRECISION,
                        DOT_IN_FP32,
                    )
                else:
                    acc, l_i, m_i = _attend_key_tile(
                        acc,
                        l_i,
                        m_i,
                        q,
                        q_groups,
                        k_base,
                        v_base,
                        key_mask_base,
                        groups_base,
                        start_n,
                        seq_len,
                        qk_scale,
                        stride_ks,
                        stride_vs,
                        offs_n,
                        offs_d,
                        d_ok,
                        BLOCK_N,
                        False,
                        HEAD_DIM != HEAD_DIM_PAD,
                        HAS_KEY_MASK,
                        HAS_GROUPS,
                        DOT_PRECISION,
                        DOT_IN_FP32,
                    )
            else:
                acc, l_i, m_i = _attend_key_tile(
                    acc,
                    l_i,
                    m_i,
                    q,
                    q_groups,
                    k_base,
                    v_base,
                    key_mask_base,
                    groups_base,
                    start_n,
                    seq_len,
                    qk_scale,
                    stride_ks,
                    stride_vs,
                    offs_n,
                    offs_d,
                    d_ok,
                    BLOCK_N,
                    MASK_KEYS,
                    HEAD_DIM != HEAD_DIM_PAD,
                    HAS_KEY_MASK,
                    HAS_GROUPS,
                    DOT_PRECISION,
                    DOT_IN_FP32,
                )

    # Epilogue. Empty rows (every key padded) have l_i == 0: output 0 and LSE -inf, as the reference defines them.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # m_i is in log2 units of the scaled scores, so the natural-log LSE is (m + log2 l) * ln 2.
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_rows[:, None] & d_ok[None, :])
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=q_rows)


# ----------------------------------------------------------------------------------------------------- launching
def is_interpreted() -> bool:
    """True when Triton runs this module's kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return isinstance(_block_sparse_attn_fwd, InterpretedFunction)


# Triton decorates its own helpers (tl.zeros, tl.sum, tl.max: jit functions since Triton 3.x) when triton is first
# imported, and this module's kernels when it is imported. TRITON_INTERPRET set in between gives interpreted kernels
# calling compiled helpers, which fails only at the first launch ("Cannot call @triton.jit'd outside of the scope of
# a kernel"): refuse here instead, with the fix.
if is_interpreted() != isinstance(tl.sum, InterpretedFunction):
    raise ImportError(
        "vidsparse.kernels.block_sparse_attn: TRITON_INTERPRET changed after triton was imported (triton's own "
        "helpers and this kernel disagree on interpretation); set TRITON_INTERPRET=1 before Python imports triton."
    )


def _cuda_configs() -> list[triton.Config]:
    """The autotuning space on CUDA: tile shapes (BLOCK_M, BLOCK_N), warps and pipeline stages.

    Kept small: every config is compiled and timed on the first call of each (S, D, block size) key. Configs whose
    tiles do not fit the plan block are pruned per call (see :func:`_prune_configs`).
    """
    shapes = [
        # BLOCK_M, BLOCK_N, warps, stages
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (64, 128, 4, 3),
        # fp32 at head dim 128 (and padded dims up to 256): the tiles above may all exceed shared memory or registers
        # with 4-byte elements; these small ones fit, so autotuning always has a candidate.
        (32, 64, 4, 2),
        (32, 32, 4, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles that divide the plan block: a query tile must not straddle two plan rows.

    Above a head dim of 128 (padded 256) only tiles of at most 64 x 64: the q tile and accumulator live in registers.
    """
    plan_block = kwargs.get("PLAN_BLOCK", named_args.get("PLAN_BLOCK"))
    head_dim = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD", 128))
    max_tile = 64 * 64 if head_dim > 128 else plan_block * plan_block
    return [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= plan_block
        and c.kwargs["BLOCK_N"] <= plan_block
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
    ]


_autotuned_fwd = triton.autotune(
    configs=_cuda_configs(),
    key=["seq_len", "HEAD_DIM", "HEAD_DIM_PAD", "PLAN_BLOCK", "MASK_KEYS", "TAIL_ONLY", "HAS_KEY_MASK", "HAS_GROUPS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_attn_fwd)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal_groups: torch.Tensor | None = None,
    q_num: torch.Tensor | None = None,
    q_idx: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the argument, the value and what is allowed."""
    check_choice("block_size", block_size, SUPPORTED_BLOCK_SIZES)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, S, D] with the same shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) are invalid: expected one shared dtype among "
            f"{', '.join(map(str, SUPPORTED_DTYPES))}."
        )
    b, h, s, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={d} is invalid: expected 1 <= head_dim <= {MAX_HEAD_DIM}.")
    if not (k.device == q.device == v.device == kv_num.device == kv_idx.device):
        raise ValueError(
            f"q, k, v, kv_num, kv_idx must share a device; got {q.device}, {k.device}, {v.device}, "
            f"{kv_num.device}, {kv_idx.device}."
        )
    if q.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            f"the Triton kernel needs CUDA tensors (got device={q.device}); on CPU set TRITON_INTERPRET=1 before "
            "importing triton, or use backend='flex'."
        )
    if kv_num.dtype != torch.int32 or kv_idx.dtype != torch.int32:
        raise ValueError(f"kv_num/kv_idx must be int32; got {kv_num.dtype}/{kv_idx.dtype}.")
    qb = num_blocks(s, block_size)
    if kv_num.dim() != 3 or kv_idx.dim() != 4 or tuple(kv_idx.shape[:3]) != tuple(kv_num.shape):
        raise ValueError(
            f"kv_num must be [B, H, Qb] and kv_idx [B, H, Qb, Kmax]; got {tuple(kv_num.shape)} and "
            f"{tuple(kv_idx.shape)}."
        )
    pb, ph, pq = kv_num.shape
    if pb not in (1, b) or ph not in (1, h) or pq != qb:
        raise ValueError(
            f"plan shape kv_num {tuple(kv_num.shape)} is invalid for q {tuple(q.shape)}: expected "
            f"[1 or {b}, 1 or {h}, {qb}] (Qb = ceil(S / block_size) = ceil({s} / {block_size}))."
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} is invalid: expected a finite number > 0.")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, s):
            raise ValueError(
                f"key_padding_mask must be bool [B, S] = [{b}, {s}]; got {key_padding_mask.dtype} "
                f"{tuple(key_padding_mask.shape)}."
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}; q is on {q.device}.")
    if causal_groups is not None:
        if causal_groups.dtype != torch.int32 or causal_groups.dim() != 2 or causal_groups.shape[0] not in (1, b):
            raise ValueError(
                f"causal_groups must be int32 [B or 1, S] = [{b} or 1, {s}]; got {causal_groups.dtype} "
                f"{tuple(causal_groups.shape)}."
            )
        if causal_groups.shape[1] != s or causal_groups.device != q.device:
            raise ValueError(
                f"causal_groups must have S={s} columns on {q.device}; got {tuple(causal_groups.shape)} on "
                f"{causal_groups.device}."
            )
    if (q_num is None) != (q_idx is None):
        raise ValueError("q_num and q_idx (the transposed plan) must be given together.")
    if q_num is not None:
        if (
            q_num.dtype != torch.int32
            or q_idx.dtype != torch.int32
            or q.device != q_num.device
            or q.device != q_idx.device
        ):
            raise ValueError(
                f"q_num/q_idx must be int32 on {q.device}; got {q_num.dtype} on {q_num.device} / {q_idx.dtype} on "
                f"{q_idx.device}."
            )
        if q_num.dim() != 3 or q_idx.dim() != 4 or tuple(q_idx.shape[:3]) != tuple(q_num.shape):
            raise ValueError(
                f"q_num must be [B, H, Kb] and q_idx [B, H, Kb, Qmax]; got {tuple(q_num.shape)} and "
                f"{tuple(q_idx.shape)}."
            )
        if q_num.shape[0] not in (1, b) or q_num.shape[1] not in (1, h) or q_num.shape[2] != qb:
            raise ValueError(
                f"transposed plan shape q_num {tuple(q_num.shape)} is invalid for q {tuple(q.shape)}: expected "
                f"[1 or {b}, 1 or {h}, {qb}]."
            )


#: Plans already checked: id(kv_idx) -> (id(kv_num), versions of both). In-place edits bump a tensor's version, so
#: an edited plan is checked again; entries go when kv_idx is freed.
_checked_plans: dict[int, tuple[int, int, int]] = {}


def check_plan_indices(kv_num: torch.Tensor, kv_idx: torch.Tensor, kv_blocks: int) -> None:
    """Raise ``ValueError`` unless ``0 <= kv_num <= Kmax`` and every used ``kv_idx`` entry is in ``[0, kv_blocks)``.

    The kernel trusts the plan: a count past Kmax reads the next row's indices, an index out of range reads another
    head's keys (or faults). One pass over the index tensors (one host sync), once per plan: repeated calls with the
    same, unmodified tensors cost a dict lookup.

    Args:
        kv_num: int32 ``[B, H, Qb]``.
        kv_idx: int32 ``[B, H, Qb, Kmax]``; entries past ``kv_num`` in a row are padding and not checked.
        kv_blocks: Kb, the number of key blocks of the sequence.
    """
    key = (id(kv_num), kv_num._version, kv_idx._version)
    if _checked_plans.get(id(kv_idx)) == key:
        return
    kmax = kv_idx.shape[-1]
    used = torch.arange(kmax, device=kv_idx.device) < kv_num.unsqueeze(-1)
    bad_idx = used & ((kv_idx < 0) | (kv_idx >= kv_blocks))
    stats = torch.stack([kv_num.min(), kv_num.max(), bad_idx.sum()]).tolist() if kv_num.numel() else [0, 0, 0]
    lo, hi, n_bad = stats
    if lo < 0 or hi > kmax:
        raise ValueError(
            f"plan kv_num has values in [{lo}, {hi}]: expected 0 <= kv_num <= Kmax = {kmax} (kv_idx.shape[-1])."
        )
    if n_bad:
        first = tuple(bad_idx.nonzero()[0].tolist())
        raise ValueError(
            f"plan kv_idx has {n_bad} used entries outside [0, Kb = {kv_blocks}): e.g. kv_idx{list(first)} = "
            f"{kv_idx[first].item()} (the first kv_num entries of each row are read)."
        )
    if id(kv_idx) not in _checked_plans:
        weakref.finalize(kv_idx, _checked_plans.pop, id(kv_idx), None)
    _checked_plans[id(kv_idx)] = key


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal_groups: torch.Tensor | None = None,
    *,
    tiles: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate outputs and launch the kernel (inputs already checked).

    Args:
        tiles: ``(BLOCK_M, BLOCK_N)`` to force instead of autotuning; both must divide ``block_size``. ``None``:
            autotune on CUDA, one tile of the whole plan block under the interpreter (fewest interpreted programs).
    """
    b, h, s, d = q.shape
    # Only the last dimension must be dense; everything else goes through strides.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    # Offsets inside one (batch, head) are int32 in the kernel (the (b, h) base is int64): token * stride must fit.
    if max(x.stride(2) for x in (q, k, v)) * s >= 2**31:
        raise ValueError(f"q/k/v strides {q.stride()} with S={s} overflow the kernel's int32 token offsets.")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    if s == 0 or b * h == 0:
        return out, lse
    # Broadcast plan dimensions get stride 0 here, which is what the kernel reads.
    kv_num = kv_num.expand(b, h, -1)
    kv_idx = kv_idx.expand(b, h, -1, -1)
    has_key_mask = key_padding_mask is not None
    # Bytes, not torch.bool (same storage, no copy); when there is no mask any pointer will do, it is never read.
    key_mask = key_padding_mask.contiguous().view(torch.uint8) if has_key_mask else q
    stride_mb = key_mask.stride(0) if has_key_mask else 0
    has_groups = causal_groups is not None
    # A batch of 1 broadcasts (stride 0), like the plan's dimensions.
    groups = causal_groups.contiguous() if has_groups else q
    stride_gb = groups.stride(0) if has_groups and groups.shape[0] == b else 0
    common = dict(
        HEAD_DIM=d,
        HEAD_DIM_PAD=padded_head_dim(d),
        PLAN_BLOCK=block_size,
        MASK_KEYS=s % block_size != 0 or has_key_mask or has_groups,
        # A partial last block alone: mask only the tile that crosses S (32 760 or 75 600 tokens are not multiples).
        TAIL_ONLY=s % block_size != 0 and not has_key_mask and not has_groups,
        HAS_KEY_MASK=has_key_mask,
        HAS_GROUPS=has_groups,
        # fp32 inputs would silently run as TF32 on tensor cores (10-bit mantissa); "ieee" keeps them exact.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_IN_FP32=is_interpreted() and q.dtype == torch.bfloat16,
    )
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2])
    plan_strides = (*kv_num.stride(), *kv_idx.stride(), stride_mb, stride_gb)
    args = (q, k, v, out, lse, kv_num, kv_idx, key_mask, groups, *strides, *plan_strides, h, s, scale * _LOG2E)
    if tiles is not None:
        block_m, block_n = tiles
        if block_size % block_m or block_size % block_n or min(block_m, block_n) < 16:
            raise ValueError(f"tiles={tiles!r} is invalid: both must be >= 16 and divide block_size={block_size}.")
    # Triton launches on the *current* CUDA device; a model placed on cuda:1 (diffusers device_map) would otherwise
    # run on cuda:0 with cuda:1 pointers (an illegal address).
    with _device_guard(q.device):
        if tiles is None and not is_interpreted():

            def grid(meta: dict) -> tuple[int, int]:
                return (triton.cdiv(s, meta["BLOCK_M"]), b * h)

            _autotuned_fwd[grid](*args, **common)
            return out, lse
        block_m, block_n = tiles if tiles is not None else (block_size, block_size)
        _block_sparse_attn_fwd[(triton.cdiv(s, block_m), b * h)](*args, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    return out, lse


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA tensor's device (launches go there), else a no-op context."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- the custom op
@torch.library.custom_op("vidsparse::block_sparse_attn", mutates_args=())
def _block_sparse_attn_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal_groups: torch.Tensor | None = None,
    q_num: torch.Tensor | None = None,
    q_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.vidsparse.block_sparse_attn``: the kernel as an opaque op (a graph break-free unit for compile).

    ``q_num``/``q_idx`` (the plan transposed) are not read by the forward, only saved for the backward.
    """
    # Inside the op, so the check's host sync is invisible to torch.compile (no graph break).
    check_plan_indices(kv_num, kv_idx, num_blocks(q.shape[2], block_size))
    return _launch(q, k, v, kv_num, kv_idx, block_size, scale, key_padding_mask, causal_groups)


@_block_sparse_attn_op.register_fake
def _block_sparse_attn_fake(
    q, k, v, kv_num, kv_idx, block_size, scale, key_padding_mask, causal_groups=None, q_num=None, q_idx=None
):
    """Shapes and dtypes only, for tracing (torch.compile, FakeTensor): out like q, LSE float32 [B, H, S]."""
    b, h, s, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("vidsparse::block_sparse_attn_backward", mutates_args=())
def _block_sparse_attn_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    q_num: torch.Tensor | None,
    q_idx: torch.Tensor | None,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal_groups: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each ``[B, H, S, D]`` in q's dtype, from the output's and the LSE's gradients.

    Args:
        dout: ``[B, H, S, D]``; dlse: float32 ``[B, H, S]``; q, k, v, out, lse: the forward's inputs and outputs.
        q_num, q_idx: The plan transposed (:func:`vidsparse.kernels.planning.key_to_query_index`); ``None``: derived
            here from ``kv_num``/``kv_idx`` (callers of :func:`block_sparse_attn` without a plan object).
    """
    s = q.shape[2]
    blocks = num_blocks(s, block_size)
    if q_num is None or q_idx is None:
        from .planning import key_to_query_index

        q_num, q_idx = key_to_query_index(BlockPlan(kv_num, kv_idx, block_size, s))
    # The dK/dV kernel trusts the transposed plan as the forward trusts the plan: checked once per tensor pair.
    check_plan_indices(q_num, q_idx, blocks)
    with _device_guard(q.device):
        return launch_backward(
            dout,
            dlse,
            q,
            k,
            v,
            out,
            lse,
            kv_num,
            kv_idx,
            q_num,
            q_idx,
            block_size,
            scale,
            key_padding_mask,
            causal_groups,
            head_dim_pad=padded_head_dim(q.shape[-1]),
            interpreted=is_interpreted(),
        )


@_block_sparse_attn_backward_op.register_fake
def _block_sparse_attn_backward_fake(
    dout, dlse, q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, block_size, scale, key_padding_mask, causal_groups
):
    """Shapes and dtypes only: dq, dk, dv like q, k, v (contiguous)."""
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    """Save what the backward recomputes the scores from: q, k, v, out, the LSE, the plan (and its transpose)."""
    q, k, v, kv_num, kv_idx, block_size, scale, key_padding_mask, causal_groups, q_num, q_idx = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, key_padding_mask, causal_groups)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):
    """Gradients for q, k and v; none for the plan, masks, block size or scale."""
    q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, key_padding_mask, causal_groups = ctx.saved_tensors
    # An output whose gradient autograd did not materialise contributes nothing: zeros.
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = _block_sparse_attn_backward_op(
        dout,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        kv_num,
        kv_idx,
        q_num,
        q_idx,
        ctx.block_size,
        ctx.scale,
        key_padding_mask,
        causal_groups,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_block_sparse_attn_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal_groups: torch.Tensor | None = None,
    q_num: torch.Tensor | None = None,
    q_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with the Triton kernels, differentiable in q, k and v.

    Args:
        q, k, v: ``[B, H, S, D]`` in plan order, one dtype of float16/bfloat16/float32, D <= 256 (powers of two
            from 16 run unpadded, others padded to the next one); CUDA
            tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
        kv_num: int32 ``[B or 1, H or 1, Qb]``, ``Qb = ceil(S / block_size)``: key blocks per query block.
        kv_idx: int32 ``[B or 1, H or 1, Qb, Kmax]``: the key blocks, first ``kv_num`` entries of a row read.
        block_size: Tokens per plan block (64 or 128); the last block may be partial.
        scale: Softmax scale, default ``1 / sqrt(D)``.
        key_padding_mask: Optional bool ``[B, S]``, True where a key may be attended (ANDed with the plan).
        causal_groups: Optional int32 ``[B or 1, S]`` in plan order: a query attends a key only when the key's group
            is not greater than its own (block-causal model masks, ANDed with the plan).
        q_num, q_idx: Optional, the plan transposed for the backward's dK/dV pass: int32 ``[B or 1, H or 1, Kb]``
            and ``[B or 1, H or 1, Kb, Qmax]`` (:func:`vidsparse.kernels.planning.key_to_query_index`, cached per
            plan). Not given: the backward derives them from ``kv_num``/``kv_idx`` at each call.

    Returns:
        ``(out [B, H, S, D] in q's dtype, lse float32 [B, H, S])``; the LSE is a natural log. A query row without
        any attendable key gets output 0 and LSE ``-inf`` (and passes no gradient). Both outputs are
        differentiable: the backward (:mod:`vidsparse.kernels.block_sparse_attn_bwd`) gives dq, dk, dv in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    _check_inputs(q, k, v, kv_num, kv_idx, block_size, scale, key_padding_mask, causal_groups, q_num, q_idx)
    return torch.ops.vidsparse.block_sparse_attn(
        q, k, v, kv_num, kv_idx, block_size, scale, key_padding_mask, causal_groups, q_num, q_idx
    )
