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
from .registry import Executor

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
    """The ``cpp`` executor (:class:`~vidsparse.kernels.registry.ExecutorFn`): float32 on the CPU.

    Raises:
        ValueError: ``q`` is not float32 or not on the CPU.
        RuntimeError: the kernel cannot be built here (see :func:`load_cpp_kernel`).
    """
    if q.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(
            f"backend='cpp' runs float32 on the CPU; got dtype={q.dtype}, device={q.device}. "
            "Use backend='gather' (any dtype) or 'auto'."
        )
    kernel = load_cpp_kernel()
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb, bs = plan.num_q_blocks, plan.block_size
    kmax = plan.kv_idx.shape[-1]
    q_blocks, k_blocks, v_blocks = (_blocked(x, qb, bs).contiguous() for x in (q, k, v))
    kv_num = plan.kv_num.expand(b, h, qb).reshape(b * h, qb).long().contiguous()
    kv_idx = plan.kv_idx.expand(b, h, qb, kmax).reshape(b * h, qb, kmax).long().contiguous()
    keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    groups = None if causal_groups is None else causal_groups.expand(b, s).to(torch.int32).contiguous()
    # Zeros and LSE -inf: what a query that sees no key gets (the kernel writes the others).
    out = torch.zeros_like(q_blocks)
    lse = torch.full(q_blocks.shape[:2], -math.inf, dtype=torch.float32)
    kernel.block_sparse_attention_cpu(q_blocks, k_blocks, v_blocks, kv_num, kv_idx, s, h, scale, keep, groups, out, lse)
    out = out.view(b, h, qb * bs, d)[:, :, :s]
    return out, (lse.view(b, h, qb * bs)[:, :, :s] if return_lse else None)


EXECUTOR = Executor(
    name="cpp",
    run=cpp_block_sparse_attention,
    summary="block-sparse flash-attention kernel in C++: the fast path on the CPU, float32",
    devices=("cpu",),
    dtypes=(torch.float32,),
    has_backward=False,
    available=lambda: cpp_kernel_available(),  # looked up per call, so a test can stand in for a failed build
    unavailable="the cpp CPU kernel could not be built here (see vidsparse.kernels.cpp.load_cpp_kernel())",
)
