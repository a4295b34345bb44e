"""vidsparse: block-sparse attention for diffusers video pipelines, and the harness that measures what it costs.

The whole public surface:

- :func:`apply` / :func:`remove`: install sparse attention on a pipeline or transformer, and restore it.
- :func:`make_plan` / :func:`attention`: the same methods on raw tensors, for research and tests.
- :class:`VideoLayout`, :class:`BlockPlan`: the geometry of a sequence and the one mask format.
- Configs: one frozen dataclass per method (see :mod:`vidsparse.methods`).

Importing the package needs only torch: the diffusers integration (``apply``, ``remove``, ``attach``,
``make_processor``, ``SparseHandle``) loads on first use (PEP 562), so the executors and planners run where diffusers
is not installed (a bare GPU machine, see ``kernels/gpu_check.sh``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import SparseConfig
from .layout import VideoLayout
from .methods import MethodSpec, PlanContext, build_plan, make_config, method_names, register_method
from .plan import BlockPlan

if TYPE_CHECKING:
    from .integration import SparseHandle, apply, attach, make_processor, remove

#: Folders at the top of the repository that are subpackages of ``vidsparse`` (pyproject.toml's package-dir).
_TOP_LEVEL_SUBPACKAGES = ("kernels", "pipelines", "eval")


class _CheckoutSubpackages(importlib.abc.MetaPathFinder):
    """Finds ``vidsparse.kernels`` / ``.pipelines`` / ``.eval`` in the top-level folders of a source checkout.

    Those folders have no ``__init__.py`` on purpose: a process started at the repository root has the root on
    ``sys.path``, and a regular package there named ``kernels`` would shadow the distribution of that name (the
    model hub's kernel loader, which transformers imports). Without ``__init__.py`` they are namespace portions,
    which lose to any installed package. A wheel puts them inside this package, where the ordinary import system
    finds them; setuptools' editable finder cannot resolve a namespace package nested in a regular one, so an
    editable checkout maps these three names here, and nothing else.
    """

    def __init__(self, folders: dict[str, str]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A namespace-package spec for one of the mapped subpackages; None for every other name."""
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


def _map_checkout_subpackages() -> None:
    package = Path(__file__).resolve().parent
    if (package / "kernels").is_dir():
        return  # installed from a wheel: the subpackages are folders of this package
    root = package.parent
    folders = {f"{__name__}.{name}": str(root / name) for name in _TOP_LEVEL_SUBPACKAGES if (root / name).is_dir()}
    if folders and not any(isinstance(finder, _CheckoutSubpackages) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutSubpackages(folders))


_map_checkout_subpackages()

#: Public names that need diffusers, loaded on first access.
_LAZY = {name: ".integration" for name in ("SparseHandle", "apply", "attach", "make_processor", "remove")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "BlockPlan",
    "SparseHandle",
    "apply",
    "attach",
    "make_processor",
    "remove",
    "PlanContext",
    "SparseConfig",
    "VideoLayout",
    "attention",
    "method_names",
    "make_config",
    "make_plan",
    "MethodSpec",
    "register_method",
]


def make_plan(
    method_or_config: str | SparseConfig,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    layout: VideoLayout,
    *,
    ctx: PlanContext | None = None,
    **overrides: Any,
) -> BlockPlan:
    """Plan sparse attention for one sequence.

    Args:
        method_or_config: A method name (``"radial"``, ...) or a config instance.
        q, k: ``[B, S, H, D]`` (diffusers layout), S = ``layout.seq_len``; may be ``None`` for static methods.
        layout: Geometry of the sequence in latent tokens, e.g. ``VideoLayout(frames=9, height=30, width=52)``.
        ctx: Layer/step information for methods that depend on it (default: layer 0, step 0).
        **overrides: Config fields, e.g. ``density=0.25``.

    Returns:
        The :class:`BlockPlan` (validated invariants: own block kept, text dense).
    """
    config = make_config(method_or_config, **overrides)
    return build_plan(config, q, k, layout, ctx)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run attention under ``plan``: q/k/v ``[B, S, H, D]`` -> out ``[B, S, H, D]`` (and LSE ``[B, H, S]``).

    See :func:`vidsparse.kernels.dispatch.block_sparse_attention` for the arguments.
    """
    from .kernels.dispatch import block_sparse_attention

    return block_sparse_attention(
        q, k, v, plan, backend=backend, scale=scale, return_lse=return_lse, key_padding_mask=key_padding_mask
    )
