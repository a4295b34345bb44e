"""``vidsparse study NAME``: every measurement script is reached from the one CLI, with its own options."""

from __future__ import annotations

import json

import pytest

from vidsparse.cli import main
from vidsparse.commands.study import STUDIES


def test_every_study_is_listed_and_has_its_own_help(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    listing = capsys.readouterr().out
    for name in STUDIES:
        assert name in listing
    for name in STUDIES:
        with pytest.raises(SystemExit) as exc:
            main(["study", name, "--help"])
        assert exc.value.code == 0
        assert f"usage: vidsparse study {name}" in capsys.readouterr().out


def test_unknown_study_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["study", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_moba_sweep_writes_every_rule_and_partition(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = main(["study", "moba-sweep", "--geometry", "3x8x8", "--heads", "2", "--head-dim", "16", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["geometry"] == [3, 8, 8]
    rules = {row["rule"] for row in data["rows"]}
    assert {"topk", "threshold head pool", "threshold softmax"} <= rules
    assert {row["partition"] for row in data["rows"]} == {"1d", "2d", "3d"}
    for row in data["rows"]:
        assert 0 < row["density"] <= 1 and row["rel_l2"] >= 0
        assert row["vs_oracle"] is None or row["vs_oracle"] > 0
    # A sparse row exists on this grid, and its error is compared with the oracle's at its density.
    assert any(row["density"] < 0.9 and row["vs_oracle"] is not None for row in data["rows"])
    assert "| topk |" in capsys.readouterr().out
