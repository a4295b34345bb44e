"""Block-sparse flash attention (backward) over a BlockPlan index list, in Triton.

The backward of :mod:`vidsparse.kernels.block_sparse_attn`'s forward, in the FlashAttention-2 form (Dao, 2023; the
Triton fused-attention tutorial): nothing of size S x S is stored, the attention probabilities are recomputed tile by
tile from the forward's log-sum-exp, and there are no atomics, so the gradients are deterministic. Three launches::

    delta = rowsum(dO * O) - dLSE                         [B, H, S] fp32     (_bwd_preprocess)
    dQ:   one program per query tile, over the key blocks its plan row keeps (kv_num / kv_idx)   (_bwd_dq)
    dK/dV: one program per key tile, over the query blocks that keep it: the plan transposed
          (q_num / q_idx, :func:`vidsparse.kernels.planning.key_to_query_index`)                 (_bwd_dkdv)

With ``s = scale * q.k``, ``p = exp(s - lse)``, ``dP = dO @ V^T`` and ``dS = p * (dP - delta)``::

    dQ = scale * dS @ K        dK = scale * dS^T @ Q        dV = p^T @ dO

Each program writes only its own rows of dQ (or dK and dV), so two passes over the plan replace the atomics of a
one-pass backward. The LSE's own gradient enters as a shift of delta (d lse / d s = p).

Masks are the forward's: keys past S (a partial last block), the key padding mask and block-causal groups set p to 0.
A query row that saw no key (LSE ``-inf``) gets p = 0 everywhere, so it passes no gradient (and receives dQ = 0).
Whenever anything needs masking every tile is masked (one select per score); the forward's tail-only variant is not
repeated here. The launcher here knows nothing of plans or ops: :mod:`~vidsparse.kernels.block_sparse_attn` calls
:func:`launch_backward` from the op's registered autograd formula.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_backward"]

_LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))


@triton.jit
def _bwd_preprocess(
    Out,
    DOut,
    DLse,
    Delta,
    stride_ob,
    stride_oh,
    stride_os,
    stride_dob,
    stride_doh,
    stride_dos,
    num_heads,
    seq_len,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Rows delta = rowsum(dO * O) - dLSE of BLOCK_M queries of one (batch, head), fp32 (Delta, DLse: [B*H, S])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = offs_m < seq_len
    ok = rows[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=ok, other=0.0
    )
    do = tl.load(
        DOut + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
        mask=ok,
        other=0.0,
    )
    row_base = pid_bh.to(tl.int64) * seq_len
    dlse = tl.load(DLse + row_base + offs_m, mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(Delta + row_base + offs_m, delta, mask=rows)


@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    Lse,
    Delta,
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
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dqb,
    stride_dqh,
    stride_dqs,
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
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PLAN_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """One program: dQ of BLOCK_M queries of one (batch, head), over the key blocks of their plan row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)  # int64: B*H*S*D can pass 2**31 on long videos
    off_h = (pid_bh % num_heads).to(tl.int64)
    plan_row = (pid_m * BLOCK_M) // PLAN_BLOCK  # BLOCK_M divides PLAN_BLOCK: a tile sits in one plan row

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM  # constant True unless the head dim is padded
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    key_mask_base = KeyMask + off_b * stride_mb
    groups_base = Groups + off_b * stride_gb

    q_rows = offs_m < seq_len
    qd_ok = q_rows[:, None] & d_ok[None, :]
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_ok, other=0.0
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
        mask=qd_ok,
        other=0.0,
    )
    if DOT_IN_FP32:
        # Interpreter only: its tl.dot would multiply bfloat16 bit patterns (see the forward's _attend_key_tile).
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * seq_len
    lse = tl.load(Lse + row_base + offs_m, mask=q_rows, other=float("-inf"))
    # A row that saw no key (LSE -inf), and a row past S, get +inf: p = exp2(s - inf) = 0, so no gradient at all.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + row_base + offs_m, mask=q_rows, other=0.0)
    if HAS_GROUPS:
        q_groups = tl.load(groups_base + offs_m, mask=q_rows, other=0)
    else:
        q_groups = offs_m  # never read

    # The plan's broadcast batch/head dimensions arrive with stride 0 (the forward's convention).
    n_kv = tl.load(KvNum + off_b * stride_nb + off_h * stride_nh + plan_row * stride_nq)
    idx_row = KvIdx + off_b * stride_ib + off_h * stride_ih + plan_row * stride_iq

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for j in range(0, n_kv):
        kv_block = tl.load(idx_row + j * stride_ik)
        for sub in tl.static_range(PLAN_BLOCK // BLOCK_N):
            cols = kv_block * PLAN_BLOCK + sub * BLOCK_N + offs_n
            in_seq = cols < seq_len
            # K and V loaded transposed (D x BLOCK_N): q @ K^T and dO @ V^T need no register shuffle.
            kv_ok = in_seq[None, :] & d_ok[:, None]
            kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=kv_ok, other=0.0)
            vt = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=kv_ok, other=0.0)
            if DOT_IN_FP32:
                kt = kt.to(tl.float32)
                vt = vt.to(tl.float32)
            qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
            # p is the forward's normalised probability, recomputed in base 2 from the saved LSE.
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if MASK_KEYS:
                valid = in_seq
                if HAS_KEY_MASK:
                    valid = valid & (tl.load(key_mask_base + cols, mask=in_seq, other=0) != 0)
                if HAS_GROUPS:
                    k_groups = tl.load(groups_base + cols, mask=in_seq, other=0)
                    p = tl.where(valid[None, :] & (k_groups[None, :] <= q_groups[:, None]), p, 0.0)
                else:
                    p = tl.where(valid[None, :], p, 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            # dS is rounded to K's dtype so dS @ K runs on 16-bit tensor cores, as the tutorial does (fp32 stays).
            ds = ds.to(K.dtype.element_ty)
            if DOT_IN_FP32:
                ds = ds.to(tl.float32)
            dq = tl.dot(ds, tl.trans(kt), dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=qd_ok)


@triton.jit
def _bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    Lse,
    Delta,
    QNum,
    QIdx,
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
    stride_dob,
    stride_doh,
    stride_dos,
    stride_dkb,
    stride_dkh,
    stride_dks,
    stride_dvb,
    stride_dvh,
    stride_dvs,
    stride_nb,
    stride_nh,
    stride_nk,
    stride_ib,
    stride_ih,
    stride_ik,
    stride_iq,
    stride_mb,
    stride_gb,
    num_heads,
    seq_len,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PLAN_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """One program: dK and dV of BLOCK_N keys of one (batch, head), over the query blocks that keep their block."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    plan_col = (pid_n * BLOCK_N) // PLAN_BLOCK  # BLOCK_N divides PLAN_BLOCK: a tile sits in one key block

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    row_base = pid_bh.to(tl.int64) * seq_len
    groups_base = Groups + off_b * stride_gb

    k_rows = offs_n < seq_len
    kd_ok = k_rows[:, None] & d_ok[None, :]
    k = tl.load(
        K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kd_ok, other=0.0
    )
    v = tl.load(
        V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kd_ok, other=0.0
    )
    if DOT_IN_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Which of these keys may be attended at all (inside S, not padded): fixed for the whole program.
    key_ok = k_rows
    if HAS_KEY_MASK:
        key_ok = key_ok & (tl.load(KeyMask + off_b * stride_mb + offs_n, mask=k_rows, other=0) != 0)
    if HAS_GROUPS:
        k_groups = tl.load(groups_base + offs_n, mask=k_rows, other=0)
    else:
        k_groups = offs_n  # never read

    n_q = tl.load(QNum + off_b * stride_nb + off_h * stride_nh + plan_col * stride_nk)
    idx_row = QIdx + off_b * stride_ib + off_h * stride_ih + plan_col * stride_ik

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    for j in range(0, n_q):
        q_block = tl.load(idx_row + j * stride_iq)
        for sub in tl.static_range(PLAN_BLOCK // BLOCK_M):
            rows = q_block * PLAN_BLOCK + sub * BLOCK_M + offs_m
            q_rows = rows < seq_len
            # Q loaded transposed (D x BLOCK_M), so the scores come out as S^T = K @ Q^T (BLOCK_N x BLOCK_M).
            qt = tl.load(
                q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=q_rows[None, :] & d_ok[:, None], other=0.0
            )
            do = tl.load(
                do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=q_rows[:, None] & d_ok[None, :], other=0.0
            )
            if DOT_IN_FP32:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + row_base + rows, mask=q_rows, other=float("-inf"))
            # As in _bwd_dq: a row without keys, or past S, has p = 0 (LSE taken as +inf).
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + row_base + rows, mask=q_rows, other=0.0)
            qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
            pt = tl.math.exp2(qkt * qk_scale - lse2[None, :])
            if MASK_KEYS:
                if HAS_GROUPS:
                    q_groups = tl.load(groups_base + rows, mask=q_rows, other=0)
                    pt = tl.where(key_ok[:, None] & (k_groups[:, None] <= q_groups[None, :]), pt, 0.0)
                else:
                    pt = tl.where(key_ok[:, None], pt, 0.0)
            # P^T rounded to dO's dtype for the 16-bit tensor cores (the forward rounds P the same way).
            pt_lo = pt.to(DO.dtype.element_ty)
            if DOT_IN_FP32:
                pt_lo = pt_lo.to(tl.float32)
            dv = tl.dot(pt_lo, do, dv, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty)
            if DOT_IN_FP32:
                dst = dst.to(tl.float32)
            dk = tl.dot(dst, tl.trans(qt), dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kd_ok)


# ----------------------------------------------------------------------------------------------------- launching
def _cuda_configs(tiles: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotuning candidates: each (BLOCK_M, BLOCK_N) tile with 4 and 8 warps, 2 and 3 pipeline stages."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in tiles
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles that divide the plan block (a tile must sit in one plan row / key block).

    Above a head dim of 128 (padded 256) only tiles of at most 32 x 64: a backward program keeps two accumulators
    (dK and dV, or dQ with q and dO) of BLOCK x D in registers, one more than the forward.
    """
    plan_block = kwargs.get("PLAN_BLOCK", named_args.get("PLAN_BLOCK"))
    head_dim = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD", 128))
    max_tile = 32 * 64 if head_dim > 128 else plan_block * plan_block
    return [
        c
        for c in configs
        if plan_block % c.kwargs["BLOCK_M"] == 0
        and plan_block % c.kwargs["BLOCK_N"] == 0
        and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
    ]


_TUNING_KEY = ["seq_len", "HEAD_DIM", "HEAD_DIM_PAD", "PLAN_BLOCK", "MASK_KEYS", "HAS_KEY_MASK", "HAS_GROUPS"]
# dQ keeps a long query tile and walks short key tiles; dK/dV the reverse (the tutorial's 128x32 / 32x128 shapes).
_autotuned_dq = triton.autotune(
    configs=_cuda_configs([(128, 32), (64, 64), (64, 32), (32, 64), (32, 32)]),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
)(_bwd_dq)
_autotuned_dkdv = triton.autotune(
    configs=_cuda_configs([(32, 128), (64, 64), (32, 64), (64, 32), (32, 32)]),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
)(_bwd_dkdv)


def launch_backward(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    q_num: torch.Tensor,
    q_idx: torch.Tensor,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None,
    causal_groups: torch.Tensor | None,
    *,
    head_dim_pad: int,
    interpreted: bool,
    tiles: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate dQ, dK, dV and launch the three backward kernels (inputs already checked, on q's device).

    Args:
        dout: ``[B, H, S, D]``, the output's gradient (any strides; copied only if its last dim is not dense).
        dlse: float32 ``[B, H, S]``, the LSE's gradient (zeros when the LSE was not used).
        q, k, v, out: ``[B, H, S, D]``, the forward's inputs and output, one dtype.
        lse: float32 ``[B, H, S]``, the forward's natural-log LSE (``-inf`` for a row that saw no key).
        kv_num, kv_idx: int32 ``[B or 1, H or 1, Qb]`` / ``[..., Qb, Kmax]``: the plan.
        q_num, q_idx: int32 ``[B or 1, H or 1, Kb]`` / ``[..., Kb, Qmax]``: the plan transposed.
        block_size, scale: The plan block (64 or 128) and the softmax scale of the forward.
        key_padding_mask: Optional bool ``[B, S]``; causal_groups: optional int32 ``[B or 1, S]`` (the forward's).
        head_dim_pad: The power of two the kernels compute with (the forward's ``padded_head_dim``).
        interpreted: The kernels run in Triton's interpreter (one whole plan block per tile, bf16 dots in fp32).
        tiles: ``(BLOCK_M, BLOCK_N)`` to force instead of autotuning (both divide ``block_size``).

    Returns:
        ``(dq, dk, dv)``, each ``[B, H, S, D]`` contiguous in q's dtype (accumulated in float32).
    """
    b, h, s, d = q.shape
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if s == 0 or b * h == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # The kernels' products pair dO with P in one dtype; autograd hands in out's dtype, a direct call may not.
    dout = dout.to(q.dtype)
    # Only the last dimension must be dense (autograd hands in expanded or transposed gradients).
    dout, q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (dout, q, k, v, out))
    if max(x.stride(2) for x in (dout, q, k, v, out)) * s >= 2**31:
        raise ValueError(f"strides with S={s} overflow the backward kernels' int32 token offsets.")
    # Row statistics are read as [B*H, S] rows: small, so made contiguous rather than strided.
    lse = lse.contiguous()
    dlse = dlse.to(torch.float32).expand(b, h, s).contiguous()
    delta = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    kv_num, kv_idx = kv_num.expand(b, h, -1), kv_idx.expand(b, h, -1, -1)  # broadcast dims: stride 0
    q_num, q_idx = q_num.expand(b, h, -1), q_idx.expand(b, h, -1, -1)
    has_key_mask = key_padding_mask is not None
    key_mask = key_padding_mask.contiguous().view(torch.uint8) if has_key_mask else q  # never read without a mask
    stride_mb = key_mask.stride(0) if has_key_mask else 0
    has_groups = causal_groups is not None
    groups = causal_groups.contiguous() if has_groups else q
    stride_gb = groups.stride(0) if has_groups and groups.shape[0] == b else 0
    common = dict(
        HEAD_DIM=d,
        HEAD_DIM_PAD=head_dim_pad,
        PLAN_BLOCK=block_size,
        MASK_KEYS=s % block_size != 0 or has_key_mask or has_groups,
        HAS_KEY_MASK=has_key_mask,
        HAS_GROUPS=has_groups,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays exact (no TF32 rounding)
        DOT_IN_FP32=interpreted and q.dtype == torch.bfloat16,
    )
    pre_block = 64 if head_dim_pad <= 128 else 32
    _bwd_preprocess[(triton.cdiv(s, pre_block), b * h)](
        out, dout, dlse, delta, *out.stride()[:3], *dout.stride()[:3], h, s, d, head_dim_pad, pre_block
    )
    qkvdo = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    masks = (stride_mb, stride_gb)
    dq_args = (q, k, v, dout, dq, lse, delta, kv_num, kv_idx, key_mask, groups, *qkvdo, *dq.stride()[:3])
    dq_args = (*dq_args, *kv_num.stride(), *kv_idx.stride(), *masks, h, s, scale * _LOG2E, scale)
    dkdv_args = (q, k, v, dout, dk, dv, lse, delta, q_num, q_idx, key_mask, groups, *qkvdo)
    dkdv_args = (*dkdv_args, *dk.stride()[:3], *dv.stride()[:3], *q_num.stride(), *q_idx.stride(), *masks)
    dkdv_args = (*dkdv_args, h, s, scale * _LOG2E, scale)
    if tiles is None and not interpreted:

        def grid_dq(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(s, meta["BLOCK_M"]), b * h)

        def grid_dkdv(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(s, meta["BLOCK_N"]), b * h)

        _autotuned_dq[grid_dq](*dq_args, **common)
        _autotuned_dkdv[grid_dkdv](*dkdv_args, **common)
        return dq, dk, dv
    block_m, block_n = tiles if tiles is not None else (block_size, block_size)
    if block_size % block_m or block_size % block_n or min(block_m, block_n) < 16:
        raise ValueError(f"tiles={tiles!r} is invalid: both must be >= 16 and divide block_size={block_size}.")
    _bwd_dq[(triton.cdiv(s, block_m), b * h)](*dq_args, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    _bwd_dkdv[(triton.cdiv(s, block_n), b * h)](*dkdv_args, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    return dq, dk, dv
