"""Absolute position features of the shapes transformer (vidsparse.pipelines.offline.positions)."""

import pytest
import torch

from vidsparse.pipelines.offline import positions as P


def test_table_shape_and_resolution_free_spatial_features():
    table = P.position_table(64, 3, 4, 6)
    assert table.shape == (64, 3, 4, 6) and table.dtype == torch.float32
    assert not torch.equal(table[:, 0], table[:, 1])  # frames differ
    # Spatial features depend on the position in frame-height units, (index + 0.5) / rows, not on the resolution:
    # the only token of a 1×1 grid and the centre token of a 3×3 grid both sit at (0.5, 0.5).
    coarse, fine = P.position_table(64, 1, 1, 1), P.position_table(64, 1, 3, 3)
    torch.testing.assert_close(coarse[16:, 0, 0, 0], fine[16:, 0, 1, 1])


def test_patch_embedding_keeps_weights_and_adds_the_table():
    conv = torch.nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    x = torch.randn(1, 4, 2, 4, 6)
    plain = conv(x)
    keys = set(conv.state_dict())

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embedding = conv

    holder = Holder()
    P.add_absolute_positions(holder)
    P.add_absolute_positions(holder)  # idempotent
    assert set(conv.state_dict()) == keys
    torch.testing.assert_close(conv(x), plain + P.position_table(32, 2, 2, 3))
    with pytest.raises(ValueError, match="inner_dim"):
        P.position_table(30, 1, 1, 1)
