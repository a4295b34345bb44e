"""The ``cpp`` executor: a block-sparse flash-attention kernel for the CPU, compiled from C++ on first use.

``kernels/csrc/block_sparse_cpu.cpp`` computes each query block against its kept key blocks read in place from the
blocked K/V tensors, a chunk of about 512 keys at a time through a small per-thread buffer, with an online softmax
and BLAS GEMMs (see the source for the details). Against the ``gather`` executor it saves the per-call copies of
every kept key block into fresh sequences, the log-sum-exp merges of split windows and the schedule of each new
plan, and it runs one-block queries at the rate of long ones. ``vidsparse bench attention --threads 1
--block-size 128`` at 32 760 tokens (2 heads x 64; efficiency = dense SDPA time x density / (plan + sparse time);
``samples/bench/attention_cpu_run5.json`` with ``gather``, ``run6`` with ``cpp``): draft 0.76 -> 0.95 at density
0.25, radial 0.90 -> 0.90 at 0.25 and 0.82 -> 0.98 at 0.1, cached 0.89 -> 0.97 at 0.25 and 0.75 -> 1.00 at 0.1.

It is built with torch's C++ extension loader the first time it is needed (about 30 s; cached afterwards in
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, under a name keyed by :func:`build_key`, so
checkouts and environments that differ in source, flags, torch or CPU keep separate builds) and needs a C++
compiler. Where it cannot be
built, ``backend="auto"`` uses ``gather`` instead (one warning) and ``backend="cpp"`` raises with the compiler's
reason. It takes float32 only (``auto`` hands other dtypes to ``gather``).

The same extension holds the ``cached`` method's block-mass search (``block_mass_rows``: each scored query row's
softmax mass per key block, in one pass with a running max), which
:func:`vidsparse.methods.cached.block_attention_mass` uses on the CPU (:func:`cpp_kernel_for`).

Exact: every kept (query, key) pair is computed once with the same softmax as dense SDPA; the model's key padding
(padded keys are left out of the chunks) and block-causal groups are applied per token. Tested against
``reference`` like every executor.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from vidsparse.plan import BlockPlan

from .gather import _blocked
from .planning import key_to_query_index
from .registry import Executor

#: The executor has a backward (gradients for q, k, v): see :func:`cpp_block_sparse_attention`.
HAS_BACKWARD = True
#: The kernel's source, compiled on first use.
SOURCE = Path(__file__).with_name("csrc") / "block_sparse_cpu.cpp"
#: ``-ffast-math`` lets the compiler vectorise ``exp`` with glibc's vector math (2x the kernel's speed here; without
#: all of fast-math, e.g. with ``-fno-finite-math-only``, glibc declares no vector variants), so the kernel keeps no
#: infinities in its arithmetic (a finite sentinel marks keys not seen).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
#: Seconds after which a load that has not returned says it is compiling (a cached build loads in well under 1 s).
COMPILE_NOTICE_AFTER_S = 2.0


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for); empty where /proc/cpuinfo is not readable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_key(source: bytes | None = None, cflags: list[str] | None = None) -> str:
    """12 hex digits naming the build: the source, the flags, the torch and Python versions and the CPU's features.

    The extension (and so its folder under ``TORCH_EXTENSIONS_DIR``) is named by it, so two checkouts, two
    virtual environments or two torch versions on one machine keep a build each instead of rebuilding each other's
    in turn, and a changed source gets a fresh build.
    """
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes() if source is None else source,
        " ".join(CFLAGS if cflags is None else cflags).encode(),
        torch.__version__.encode(),
        sys.version.split()[0].encode(),
        _cpu_flags().encode(),
    ):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:12]


def extension_name() -> str:
    """The name the kernel is built under: ``vidsparse_block_sparse_cpu_<build key>``."""
    return f"vidsparse_block_sparse_cpu_{build_key()}"


@functools.cache
def load_cpp_kernel() -> ModuleType:
    """The compiled kernel module, built on first use (then cached by torch on disk and here in memory).

    Raises:
        RuntimeError: it cannot be built or loaded here (no C++ compiler, no BLAS ``sgemm_`` in this torch build);
            the message carries the cause.
    """
    # torch's loader logs "No CUDA runtime is found" on CPU-only machines: true and irrelevant for a CPU kernel.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    # A first build takes about 30 s with no output of its own: say so, instead of a silent pause.
    name = extension_name()
    notice = threading.Timer(
        COMPILE_NOTICE_AFTER_S,
        lambda: print(
            f"vidsparse: compiling the cpp CPU kernel as {name} (once per source, flags, torch version and CPU; "
            "about 30 s)...",
            file=sys.stderr,
            flush=True,
        ),
    )
    notice.start()
    try:
        from torch.utils.cpp_extension import load

        return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as exc:  # compiler missing, build error, unresolved symbol: all mean "not available here"
        raise RuntimeError(f"the cpp executor's kernel could not be built: {type(exc).__name__}: {exc}") from exc
    finally:
        notice.cancel()
        logger.setLevel(level)


@functools.cache
def cpp_kernel_available() -> bool:
    """True when the C++ kernel builds and loads here (the first call may take about 30 s to compile it)."""
    try:
        load_cpp_kernel()
    except RuntimeError:
        return False
    return True


def cpp_kernel_for(device: torch.device) -> ModuleType | None:
    """The compiled kernel module when ``device`` is the CPU and the kernel builds here, else ``None``."""
    return load_cpp_kernel() if device.type == "cpu" and cpp_kernel_available() else None


#: The LSE the backward reads for a query that saw no key (the forward's ``-inf``): the kernel is compiled with
#: ``-ffast-math`` and keeps no infinities, and ``exp(score - 1e30)`` is exactly 0, so such a row gets no gradient.
NO_KEY_LSE = 1e30


def _rows(x: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """A plan index ``[B or 1, H or 1, Qb, ...]`` as contiguous int64 ``[b * h, Qb, ...]`` (the kernel's rows)."""
    return x.expand(b, h, *x.shape[2:]).reshape(b * h, *x.shape[2:]).long().contiguous()


@torch.library.custom_op("vidsparse::cpp_block_sparse_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: torch.Tensor,
    kv_idx: torch.Tensor,
    q_num: torch.Tensor,
    q_idx: torch.Tensor,
    key_keep: torch.Tensor | None,
    key_groups: torch.Tensor | None,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward as a custom op: ``(out [B, H, S, D], lse float32 [B, H, S])``.

    The arguments are :func:`cpp_block_sparse_attention`'s, the plan's indices as kernel rows; ``q_num``/``q_idx``
    (the transposed plan) are only saved for the backward.
    """
    b, h, s, d = q.shape
    qb = kv_num.shape[1]
    q_blocks, k_blocks, v_blocks = (_blocked(x, qb, block_size).contiguous() for x in (q, k, v))
    # Zeros and LSE -inf: what a query that sees no key gets (the kernel writes the others).
    out = torch.zeros_like(q_blocks)
    lse = torch.full(q_blocks.shape[:2], -math.inf, dtype=torch.float32)
    load_cpp_kernel().block_sparse_attention_cpu(
        q_blocks, k_blocks, v_blocks, kv_num, kv_idx, s, h, scale, key_keep, key_groups, out, lse
    )
    return out.view(b, h, qb * block_size, d)[:, :, :s].contiguous(), lse.view(b, h, -1)[:, :, :s].contiguous()


@_attention_op.register_fake
def _(q, k, v, kv_num, kv_idx, q_num, q_idx, key_keep, key_groups, block_size, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vidsparse::cpp_block_sparse_attention_backward", mutates_args=())
def _backward_op(
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
    key_keep: torch.Tensor | None,
    key_groups: torch.Tensor | None,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each ``[B, H, S, D]`` float32, from the output's and the LSE's gradients."""
    b, h, s, d = q.shape
    qb = kv_num.shape[1]
    # delta = rowsum(dO * O) - dLSE: the LSE's gradient enters dS = P * (dP - delta) like a shift of delta.
    delta = (dout * out).sum(-1) - dlse
    lse = torch.where(torch.isneginf(lse), NO_KEY_LSE, lse)
    blocks = [_blocked(x, qb, block_size).contiguous() for x in (q, k, v, dout, lse, delta)]
    grads = [torch.zeros_like(blocks[0]) for _ in range(3)]
    load_cpp_kernel().block_sparse_attention_backward_cpu(
        *blocks, kv_num, kv_idx, q_num, q_idx, s, h, scale, key_keep, key_groups, *grads
    )
    return tuple(g.view(b, h, qb * block_size, d)[:, :, :s].contiguous() for g in grads)


@_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, key_keep, key_groups, block_size, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_num, kv_idx, q_num, q_idx, key_keep, key_groups, block_size, scale = inputs
    ctx.save_for_backward(q, k, v, *output, kv_num, kv_idx, q_num, q_idx, key_keep, key_groups)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, dout: torch.Tensor, dlse: torch.Tensor):
    q, k, v, out, lse, kv_num, kv_idx, q_num, q_idx, key_keep, key_groups = ctx.saved_tensors
    dq, dk, dv = _backward_op(
        dout.float(),
        dlse.float(),
        q,
        k,
        v,
        out,
        lse,
        kv_num,
        kv_idx,
        q_num,
        q_idx,
        key_keep,
        key_groups,
        ctx.block_size,
        ctx.scale,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def cpp_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    causal_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``cpp`` executor (:class:`~vidsparse.kernels.registry.ExecutorFn`): float32 on the CPU, differentiable.

    It runs as the custom op ``vidsparse::cpp_block_sparse_attention`` (with ``register_autograd``), so
    ``loss.backward()`` and ``torch.compile`` go through it; a query that sees no key gets zeros (LSE ``-inf``) and
    passes no gradient.

    Raises:
        ValueError: ``q`` is not float32 or not on the CPU.
        RuntimeError: the kernel cannot be built here (see :func:`load_cpp_kernel`).
    """
    if q.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(
            f"backend='cpp' runs float32 on the CPU; got dtype={q.dtype}, device={q.device}. "
            "Use backend='gather' (any dtype) or 'auto'."
        )
    if not torch.compiler.is_compiling():
        load_cpp_kernel()  # the build error here, before any work (compiled graphs load it inside the op)
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q_num, q_idx = key_to_query_index(plan)
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    groups = None if causal_groups is None else causal_groups.expand(b, s).to(torch.int32).contiguous()
    out, lse = _attention_op(
        q,
        k,
        v,
        _rows(plan.kv_num, b, h),
        _rows(plan.kv_idx, b, h),
        _rows(q_num, b, h),
        _rows(q_idx, b, h),
        keep,
        groups,
        plan.block_size,
        scale,
    )
    return out, (lse if return_lse else None)


EXECUTOR = Executor(
    name="cpp",
    run=cpp_block_sparse_attention,
    summary="block-sparse flash-attention kernel in C++: the fast path on the CPU, float32",
    devices=("cpu",),
    dtypes=(torch.float32,),
    has_backward=HAS_BACKWARD,
    available=lambda: cpp_kernel_available(),  # looked up per call, so a test can stand in for a failed build
    unavailable="the cpp CPU kernel could not be built here (see vidsparse.kernels.cpp.load_cpp_kernel())",
)
