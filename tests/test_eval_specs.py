"""Sweep method specs (expansion over densities, canonical labels), run identity, result files, report helpers."""

import json
import stat

import eval_fakes
import numpy as np
import pytest

from vidsparse.eval.harness import EvalJob, Geometry, plan_jobs, side_by_side
from vidsparse.eval.report import pareto_front
from vidsparse.eval.results import load_run, run_path, write_json_atomic
from vidsparse.eval.specs import canonical_spec, default_methods, expand_methods, targets_density
from vidsparse.methods import method_names, parse_method_spec
from vidsparse.video_io import default_file_mode


@pytest.fixture
def fakes(monkeypatch):
    eval_fakes.register(monkeypatch)


def test_canonical_spec_round_trips_and_drops_defaults():
    config = parse_method_spec("window:window=0,block_size=64,dense_steps=0.25")
    assert canonical_spec(config) == "window:dense_steps=0.25,window=0"
    assert parse_method_spec(canonical_spec(config)) == config
    assert canonical_spec(parse_method_spec("dense")) == "dense"


def test_targets_density(fakes):
    assert targets_density("band")
    assert not targets_density("window")
    assert not targets_density("dense")


def test_expand_needs_density_to_parse():
    # moba's default selection derives its density from tau; top-k selection needs a density to be valid at all.
    runs = expand_methods(["moba:selection=topk", "moba"], [0.125, 0.25])
    assert [r.spec for r in runs[:2]] == ["moba:density=0.125,selection=topk", "moba:density=0.25,selection=topk"]
    assert runs[2].spec == "moba" and "density not applied" in runs[2].note
    with pytest.raises(ValueError, match="density"):
        expand_methods(["moba:selection=topk"])


def test_expand_over_densities(fakes):
    runs = expand_methods(["band", "window:window=0", "band:density=0.3", "band"], [0.25, 0.5])
    specs = [r.spec for r in runs]
    # band expands, the duplicate "band" is dropped, window and the explicit density run once with a note.
    assert specs == ["band:density=0.25", "band", "window:window=0", "band:density=0.3"]
    notes = {r.spec: r.note for r in runs}
    assert notes["band:density=0.25"] is None
    assert "no density target" in notes["window:window=0"]
    assert "sets its own density" in notes["band:density=0.3"]
    assert [r.spec for r in expand_methods(["band"])] == ["band"]


@pytest.mark.parametrize("bad", [[0.0], [1.5], [float("nan")]])
def test_bad_densities_are_named(bad):
    with pytest.raises(ValueError, match="--densities"):
        expand_methods(["window"], bad)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="nosuch"):
        expand_methods(["nosuch"])


def test_default_methods_are_registered():
    defaults = default_methods()
    assert len(defaults) == 2 and set(defaults) <= set(method_names())


def _jobs(**overrides):
    kwargs = dict(
        model="tiny-wan",
        prompts=["a", "b"],
        seeds=[0, 1],
        methods=expand_methods(["window:window=0", "dense"]),
        geometry=Geometry(5, 64, 64, 2, 5.0),
        dtype="float32",
        device_type="cpu",
    )
    kwargs.update(overrides)
    return plan_jobs(**kwargs)


def test_jobs_and_stable_ids():
    jobs = _jobs()
    assert len(jobs) == 2 * 2 * 3
    assert [j.label for j in jobs[:3]] == ["dense reference", "window:window=0", "dense"]
    assert jobs[0].is_dense and jobs[0].run_id == jobs[0].ref_id == jobs[1].ref_id
    ids = [j.run_id for j in jobs]
    assert len(set(ids)) == len(ids)
    assert ids == [j.run_id for j in _jobs()]  # same arguments, same ids (what --resume relies on)
    # Anything that changes the output changes the id; the note does not.
    assert _jobs(geometry=Geometry(5, 64, 64, 3, 5.0))[1].run_id != jobs[1].run_id
    assert _jobs(methods=expand_methods(["window:window=1"]))[1].run_id != jobs[1].run_id
    assert _jobs(model_seed=1)[0].run_id != jobs[0].run_id
    noted = EvalJob(**{**jobs[1].__dict__, "note": "something"})
    assert noted.run_id == jobs[1].run_id


def test_plan_jobs_needs_prompts_and_seeds():
    with pytest.raises(ValueError, match="prompts"):
        _jobs(prompts=[])
    with pytest.raises(ValueError, match="seeds"):
        _jobs(seeds=[])


def test_run_files_validate(tmp_path):
    assert load_run(tmp_path, "x-1") == (None, "absent")
    path = run_path(tmp_path, "x-1")
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": "vidsparse.eval.run", "schema_ver')  # a torn write
    record, reason = load_run(tmp_path, "x-1")
    assert record is None and "unreadable" in reason
    good = {
        "schema": "vidsparse.eval.run",
        "schema_version": 1,
        "run_id": "x-1",
        "kind": "dense",
        "status": "ok",
        "job": {},
        "timing": {},
        "env": {},
        "artifacts": {"frames": "refs/r/frames.npy"},
    }
    write_json_atomic(path, good)
    assert "frames.npy is missing" in load_run(tmp_path, "x-1")[1]
    (tmp_path / "refs/r").mkdir(parents=True)
    np.save(tmp_path / "refs/r/frames.npy", np.zeros((1, 2, 2, 3), np.float32))
    assert load_run(tmp_path, "x-1")[0]["status"] == "ok"
    write_json_atomic(path, {**good, "run_id": "other"})
    assert "does not match" in load_run(tmp_path, "x-1")[1]
    write_json_atomic(path, {**good, "status": "failed"})
    assert "without an error" in load_run(tmp_path, "x-1")[1]
    assert not list(path.parent.glob(".tmp-*"))


def test_json_is_strict_with_infinities(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"psnr": float("inf"), "x": [1.5, float("-inf")]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"psnr": "inf", "x": [1.5, "-inf"]}
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == default_file_mode()  # not mkstemp's 0600


def test_side_by_side_panels():
    dense = np.full((2, 4, 6, 3), 0.5, np.float32)
    sparse = dense.copy()
    sparse[:, 0, 0] = 0.4
    clip = side_by_side(dense, sparse, gain=4.0)
    assert clip.shape == (2, 4, 18, 3)
    np.testing.assert_array_equal(clip[:, :, :6], dense)
    np.testing.assert_array_equal(clip[:, :, 6:12], sparse)
    np.testing.assert_allclose(clip[:, 0, 12], 0.4, atol=1e-6)  # |0.1| * 4
    assert clip[:, 1:, 12:].max() == 0


def test_pareto_front():
    points = [(1.0, 30.0), (2.0, 25.0), (1.5, 20.0), (3.0, 10.0), (0.5, 40.0)]
    assert pareto_front(points) == [4, 0, 1, 3]
