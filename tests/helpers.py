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
    return BlockPlan.from_block_mask(mask, block_size=block_size, seq_len=seq_len, perm=p)


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
