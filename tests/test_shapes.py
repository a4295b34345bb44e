"""The shipped trained model: loads offline from the package files, renders deterministically."""

import numpy as np
import pytest
import torch

from vidsparse.pipelines.offline import shapes
from vidsparse.pipelines.offline.tiny import TINY_PIPELINES, get_spec


@pytest.fixture(scope="module")
def pipe():
    return shapes.load_shapes_pipeline()


def test_weights_ship_inside_the_package_and_stay_small():
    folder = shapes.model_dir()
    assert folder.is_relative_to(__import__("pathlib").Path(shapes.__file__).parent)
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(folder).as_posix() for p in files}
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"} <= names
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_loads_offline_with_from_pretrained(pipe, monkeypatch):
    from diffusers import WanPipeline, WanTransformer3DModel

    from vidsparse.pipelines.offline.pixel_vae import PixelShuffleVAE

    assert isinstance(pipe, WanPipeline)
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, PixelShuffleVAE)
    # A second load with the hub switched off must work as well (everything is read from the package).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = shapes.load_shapes_pipeline()
    for (name, a), b in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_is_the_default_tiny_pipeline_with_4k_tokens():
    assert next(iter(TINY_PIPELINES)) == "shapes"
    spec = get_spec("shapes")
    latent_frames = (spec.frames - 1) // 2 + 1  # PixelShuffleVAE: 2 frames per latent frame after the first
    tokens = latent_frames * (spec.height // 4) * (spec.width // 4)  # 2x2 pixels per latent, 2x2 patches
    assert tokens >= 4096


def test_two_step_render_is_deterministic(pipe):
    def render(seed):
        return pipe(
            "a red circle moves right over a plain gray background",
            num_frames=9,
            height=32,
            width=32,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).frames[0]

    first, second, other = render(0), render(0), render(1)
    assert first.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 0.05
