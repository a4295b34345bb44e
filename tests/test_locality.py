import numpy as np
import torch

from vidsparse.eval.locality import _LocalityRecorder, attention_locality


def test_uniform_attention_matches_the_baseline():
    rec = _LocalityRecorder((3, 2, 4), num_layers=2, query_chunk=5)
    q = torch.zeros(1, 24, 2, 8)  # zero queries: softmax is uniform over keys
    rec.record(q, torch.randn(1, 24, 2, 8))
    uniform_t, uniform_s = rec.uniform()
    np.testing.assert_allclose((rec.temporal[0] / rec.counts[0]).numpy(), uniform_t, atol=1e-12)
    np.testing.assert_allclose((rec.spatial[0] / rec.counts[0]).numpy(), uniform_s, atol=1e-12)
    assert rec.counts[1] == 0  # the second call would go to layer 1
    assert abs(uniform_t.sum() - 1) < 1e-12 and abs(uniform_s.sum() - 1) < 1e-12


def test_self_only_attention_is_all_at_distance_zero():
    rec = _LocalityRecorder((2, 3, 3), num_layers=1, query_chunk=7)
    keys = torch.nn.functional.one_hot(torch.arange(18), 18).float()[None, :, None, :] * 50.0  # orthogonal keys
    rec.record(keys, keys)
    temporal = (rec.temporal[0] / rec.counts[0]).numpy()
    spatial = (rec.spatial[0] / rec.counts[0]).numpy()
    assert temporal[0] > 0.999 and spatial[0] > 0.999


def test_pipeline_run_records_every_layer():
    from vidsparse.pipelines.offline.tiny import build

    pipe = build("wan")
    pipe.set_progress_bar_config(disable=True)
    stats = attention_locality(pipe, "a red circle", num_frames=5, height=32, width=32, num_inference_steps=2)
    layers = pipe.transformer.config.num_layers
    assert stats["grid"] == (2, 2, 2)
    assert stats["temporal"].shape == (layers, 2) and stats["calls_per_layer"] == 4  # 2 steps x (cond, uncond)
    np.testing.assert_allclose(stats["temporal"].sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(stats["spatial"].sum(1), 1.0, atol=1e-9)
