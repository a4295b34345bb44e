import json

import pytest
import torch

from vidsparse.pipelines.training import train_tiny as T

TINY_RUN = T.TrainConfig(phases=(T.Phase(2, 1, 2), T.Phase(1, 3, 1)), height=16, width=16, checkpoint_every_s=0.0)


@pytest.fixture(scope="module")
def pipe():
    return T.build_untrained_pipeline(0)


def test_compact_padding_equals_pipeline_padding(pipe):
    """Training's collapsed zero-padding gives the transformer output of WanPipeline's 512-token padding."""
    transformer = pipe.transformer.eval()
    captions = ["a red circle moves left over a plain gray background", ""]
    latents = torch.randn(2, 24, 2, 8, 8)
    timestep = torch.tensor([200.0, 800.0])
    with torch.no_grad():
        full, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
        expected = transformer(latents, timestep, full, return_dict=False)[0]
        context, bias = T.encode_captions(pipe, captions)
        assert context.shape[1] < 32
        cross = T._CompactPaddingCrossAttention()
        cross.bias = bias
        stock = transformer.attn_processors
        transformer.set_attn_processor({n: (cross if ".attn2." in n else p) for n, p in stock.items()})
        try:
            got = transformer(latents, timestep, context, return_dict=False)[0]
        finally:
            transformer.set_attn_processor(stock)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_batches_are_unit_scale_and_seeded(pipe):
    latents, captions = T.sample_batch(pipe, TINY_RUN, 3, frames=5, batch=4)
    assert latents.shape == (4, 24, 3, 8, 8)
    again, captions_again = T.sample_batch(pipe, TINY_RUN, 3, frames=5, batch=4)
    torch.testing.assert_close(latents, again, rtol=0, atol=0)
    assert captions == captions_again
    full, _ = T.sample_batch(pipe, T.TrainConfig(), 0, frames=9, batch=8)
    assert 0.5 < full.std().item() < 1.5  # normalised by the VAE's stored statistics


def test_schedule():
    config = T.TrainConfig(phases=(T.Phase(10, 1, 4), T.Phase(5, 5, 2)), warmup_steps=4, lr=1e-3, min_lr_ratio=0.1)
    assert config.total_steps == 15
    assert config.phase_at(9).frames == 1 and config.phase_at(10).frames == 5
    assert config.lr_at(0) == pytest.approx(2.5e-4) and config.lr_at(3) == pytest.approx(1e-3)
    assert config.lr_at(14) == pytest.approx(1e-4, rel=0.05)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    straight = T.train(tmp_path / "a", TINY_RUN)
    assert straight["done"] and straight["step"] == 3
    first = T.train(tmp_path / "b", TINY_RUN, max_minutes=0.0)  # stops (with a checkpoint) after one step
    assert first["step"] == 1 and not first["done"]
    assert T.train(tmp_path / "b")["step"] == 3  # resumes with the saved config
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and log[-1]["frames"] == 3

    with pytest.raises(ValueError, match="config differs"):
        T.train(tmp_path / "a", T.TrainConfig(lr=0.5))


def test_export_loads_with_from_pretrained(tmp_path):
    from vidsparse.pipelines.offline.shapes import load_shapes_pipeline

    T.train(tmp_path / "run", T.TrainConfig(phases=(T.Phase(1, 1, 1),), height=16, width=16))
    T.export(tmp_path / "run", tmp_path / "model")
    pipe = load_shapes_pipeline(path=str(tmp_path / "model"))
    assert type(pipe.vae).__name__ == "PixelShuffleVAE" and pipe.vae.config.z_dim == 24
    assert type(pipe.transformer.patch_embedding).__name__ == "PositionalPatchEmbedding"  # re-added on load
    video = pipe("a red circle", num_frames=3, height=16, width=16, num_inference_steps=1, output_type="np").frames[0]
    assert video.shape == (3, 16, 16, 3)


def test_warmup_stable_decay_schedule_and_extension(tmp_path):
    short = T.TrainConfig(
        phases=(T.Phase(3, 1, 1), T.Phase(2, 3, 1)), height=16, width=16, warmup_steps=1, decay_steps=2
    )
    assert short.lr_at(0) == short.lr_at(2) == short.lr  # warm-up of 1 step, then constant until the decay
    assert short.lr_at(4) == pytest.approx(short.lr * short.min_lr_ratio)
    longer = T.TrainConfig(**{**short.__dict__, "phases": (T.Phase(5, 1, 1), T.Phase(2, 3, 1))})
    assert longer.same_history(short, 3) and not longer.same_history(short, 4)  # step 3 changes phase

    T.train(tmp_path, short, max_minutes=0.0)  # one step taken
    assert T.train(tmp_path, longer)["step"] == 7  # extension accepted: same first step
    log = (tmp_path / "train_log.jsonl").read_text()
    assert '"extended_at_step": 1' in log
    with pytest.raises(ValueError, match="only be extended"):
        T.train(tmp_path, short)


def test_fine_tune_starts_from_the_source_runs_ema_weights(tmp_path):
    small = {"height": 16, "width": 16, "warmup_steps": 1, "decay_steps": 1}
    T.train(tmp_path / "a", T.TrainConfig(phases=(T.Phase(1, 1, 1),), **small))
    config = T.TrainConfig(phases=(T.Phase(1, 3, 1),), lr=1e-12, init_from=str(tmp_path / "a"), **small)
    T.train(tmp_path / "b", config)
    source = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["ema"]
    tuned = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    for name, value in source.items():
        torch.testing.assert_close(tuned[name], value, atol=1e-6, rtol=0, msg=name)
    assert (tmp_path / "b" / "text" / "tokenizer").is_dir()  # the source's text side came along


def _word_vectors(pipe, caption: str) -> torch.Tensor:
    ids = pipe.tokenizer(caption, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state[0]


def test_text_encoder_encodes_which_colour_belongs_to_the_shape(pipe):
    # Same words, colours swapped between shape and background: a bag-of-words encoder (random relative-position
    # bias) gives cosine 0.999 for "red" in both slots; the neighbour-attending first layer must tell them apart.
    a = _word_vectors(pipe, "a red circle moves right over a plain blue background")
    b = _word_vectors(pipe, "a blue circle moves right over a plain red background")
    cos = torch.nn.functional.cosine_similarity
    assert cos(a[1], b[8], dim=0) < 0.8  # "red" as the shape's colour vs as the background's
    assert cos(a[2], b[2], dim=0) < 0.8  # "circle" after "red" vs after "blue"
    assert cos(a[1], b[1], dim=0) < 0.5  # different colours stay different


def test_fine_tune_can_switch_to_a_new_text_encoder(tmp_path):
    small = {"height": 16, "width": 16, "warmup_steps": 1, "decay_steps": 1}
    T.train(tmp_path / "a", T.TrainConfig(phases=(T.Phase(1, 1, 1),), **small))
    old_encoder = tmp_path / "a" / "text" / "text_encoder" / "model.safetensors"
    old_encoder.unlink()  # a source run whose text side must not be used (it would fail to load)
    config = T.TrainConfig(phases=(T.Phase(1, 1, 1),), init_from=str(tmp_path / "a"), new_text_encoder=True, **small)
    T.train(tmp_path / "b", config)
    assert (tmp_path / "b" / "text" / "text_encoder" / "model.safetensors").is_file()


def test_pure_noise_fraction_trains_that_share_of_samples_at_sigma_one():
    timesteps = []

    def transformer(noisy, timestep, context, return_dict=False):
        timesteps.append(timestep.clone())
        return (torch.zeros_like(noisy),)

    latents = torch.randn(256, 2, 1, 2, 2)
    T.flow_matching_loss(transformer, latents, None, torch.Generator().manual_seed(0), 5.0, "x0", 0.25)
    T.flow_matching_loss(transformer, latents, None, torch.Generator().manual_seed(0), 5.0, "x0")
    with_pure, without = timesteps
    pure = with_pure == 1000.0
    assert 0.15 < pure.float().mean() < 0.35
    assert (without < 1000.0).all()
    # The other samples keep their sigma: a run without the option keeps its random stream (and its resumes).
    assert torch.equal(with_pure[~pure], without[~pure])
    with pytest.raises(ValueError, match="pure_noise_fraction=1.0"):
        T.TrainConfig(pure_noise_fraction=1.0)
