import pytest
import torch

from vidsparse.pipelines.offline.pixel_vae import PixelShuffleVAE


def test_encode_decode_is_exact_and_follows_wan_frame_layout():
    vae = PixelShuffleVAE(scale_factor_spatial=2, scale_factor_temporal=2)
    video = torch.rand(2, 3, 9, 8, 12) * 2 - 1
    latents = vae.encode(video).latent_dist.sample()
    assert latents.shape == (2, 24, 5, 4, 6)  # (9 - 1) // 2 + 1 latent frames, like AutoencoderKLWan
    assert vae.config.z_dim == 24
    torch.testing.assert_close(vae.decode(latents).sample, video, rtol=0, atol=0)
    # Latent frame 0 holds frame 0 alone; latent frame 1 holds frames 1 and 2.
    torch.testing.assert_close(latents[:, :, 0], vae.pack(video[:, :, :1])[:, :, 0])
    torch.testing.assert_close(latents[:, :, 1:2], vae.pack(video[:, :, [0, 1, 2]])[:, :, 1:])


def test_channel_order_is_documented_one():
    # Channel ((rgb * st + dt) * s + dy) * s + dx of latent pixel (t, i, j) is video[rgb, 1 + (t-1)*st + dt, ...].
    vae = PixelShuffleVAE(scale_factor_spatial=2, scale_factor_temporal=2)
    video = torch.randn(1, 3, 5, 4, 4)
    z = vae.pack(video)
    rgb, dt, dy, dx, t, i, j = 2, 1, 0, 1, 2, 1, 0
    channel = ((rgb * 2 + dt) * 2 + dy) * 2 + dx
    assert z[0, channel, t, i, j] == video[0, rgb, 1 + (t - 1) * 2 + dt, i * 2 + dy, j * 2 + dx]


def test_decode_clamps_and_averages_first_frame_copies():
    vae = PixelShuffleVAE(scale_factor_spatial=1, scale_factor_temporal=2)
    z = torch.zeros(1, 6, 2, 1, 1)
    z[0, 0, 0] = 0.2  # copy 0 of frame 0, red
    z[0, 1, 0] = 0.6  # copy 1 of frame 0, red
    z[0, 0, 1] = 5.0  # frame 1 (latent frame 1, dt 0), red, out of range
    z[0, 3, 1] = -7.0  # frame 2 (dt 1), green, out of range
    video = vae.decode(z).sample
    assert video.shape == (1, 3, 3, 1, 1)
    assert video[0, 0, 0].item() == pytest.approx(0.4)
    assert video[0, 0, 1].item() == 1.0 and video[0, 1, 2].item() == -1.0


def test_save_and_load_roundtrip_without_weights(tmp_path):
    vae = PixelShuffleVAE(latents_mean=[0.5] * 24, latents_std=[2.0] * 24)
    vae.save_pretrained(tmp_path)
    loaded = PixelShuffleVAE.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.config.latents_mean == [0.5] * 24 and loaded.config.latents_std == [2.0] * 24
    assert loaded.config.z_dim == 24 and loaded.dtype == torch.float16


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"scale_factor_spatial": 0}, "scale_factor_spatial"),
        ({"latents_mean": [0.0] * 3}, "latents_mean"),
        ({"z_dim": 7}, "z_dim"),
    ],
)
def test_bad_config_names_the_parameter(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PixelShuffleVAE(**kwargs)


def test_bad_video_shape_is_rejected():
    vae = PixelShuffleVAE()
    with pytest.raises(ValueError, match="frames-1 must be divisible by 2"):
        vae.pack(torch.zeros(1, 3, 4, 8, 8))
