"""Shared test helpers: random plans and inputs."""

from __future__ import annotations

import torch

from vidsparse.plan import BlockPlan, num_blocks


def random_block_mask(b: int, h: int, qb: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """bool [b, h, qb, qb] with about ``density`` of the entries set and the diagonal always set."""
    mask = torch.rand(b, h, qb, qb, generator=generator) < density
    idx = torch.arange(qb)
    mask[:, :, idx, idx] = True
    return mask


def random_plan(
    seq_len: int, block_size: int, *, b: int = 1, h: int = 1, density: float = 0.4, seed: int = 0, perm: bool = False
) -> BlockPlan:
    """A random valid plan (own block kept), optionally with a random token permutation."""
    gen = torch.Generator().manual_seed(seed)
    qb = num_blocks(seq_len, block_size)
    mask = random_block_mask(b, h, qb, density, gen)
    p = torch.randperm(seq_len, generator=gen) if perm else None
    return BlockPlan.from_block_mask(mask, block_size=block_size, seq_len=seq_len, perm=p).validate()


#: Gradient tolerances against the reference's float32 autograd: sums over a few hundred keys round differently.
GRAD_TOL = {
    torch.float32: {"atol": 2e-4, "rtol": 2e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


def grads(backend: str, q, k, v, plan: BlockPlan, dout, dlse=None, **masks):
    """``(out, lse, dq, dk, dv)`` of ``block_sparse_attention`` under ``backend`` for the output gradient ``dout``
    (``[B, S, H, D]``) and, optionally, the LSE gradient ``dlse`` (``[B, H, S]``)."""
    from vidsparse.kernels.dispatch import block_sparse_attention

    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True, **masks)
    loss = (out.float() * dout).sum()
    if dlse is not None:
        # Only rows that see a key: the LSE of an empty row is -inf (its own gradient would be NaN).
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_same_grads(backend: str, q, k, v, plan: BlockPlan, *, seed: int, with_lse: bool = False, **masks) -> None:
    """``backend``'s output, LSE and dQ/dK/dV equal the reference's autograd (in float32, from the same inputs)."""
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen) if with_lse else None
    ref = grads("reference", *(x.float() for x in (q, k, v)), plan, dout, dlse, **masks)
    got = grads(backend, q, k, v, plan, dout, dlse, **masks)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        assert a.dtype == (torch.float32 if name == "lse" else q.dtype), (name, a.dtype)
        torch.testing.assert_close(a.float(), b, **GRAD_TOL[q.dtype], msg=lambda m, n=name: f"{backend} {n}: {m}")


def qkv(b: int, s: int, h: int, d: int, *, seed: int = 0, dtype=torch.float32):
    """Random q, k, v in diffusers layout [B, S, H, D]."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen).to(dtype) for _ in range(3))


def has_cxx_compiler() -> bool:
    """True where the cpp executor's kernel can be compiled (a C++ compiler on PATH); without one, auto uses gather."""
    import shutil

    return shutil.which("c++") is not None or shutil.which("g++") is not None


def cpu_executors(*, dtype: torch.dtype | None = None, interpreted: bool = False) -> list[str]:
    """The test matrix, from the executor registry: the executors made for the CPU, other than ``reference`` (the
    oracle they are compared to), that compute ``dtype`` (None: any).

    ``cpp`` is in it wherever a C++ compiler exists (not merely where its kernel happens to build, so a broken build
    fails the tests instead of leaving them out). ``interpreted`` adds the executors that run on CPU tensors only
    under Triton's interpreter (``triton``, when Triton imports).
    """
    from vidsparse.kernels.registry import executors

    names = []
    for spec in executors():
        if spec.name == "reference" or not spec.computes(dtype):
            continue
        if spec.runs_on("cpu"):
            if spec.name != "cpp" or has_cxx_compiler():
                names.append(spec.name)
        elif interpreted and spec.name == "triton" and spec.available():
            names.append(spec.name)
    return names
