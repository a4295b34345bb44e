"""`vidsparse finetune`: LoRA training under sparse attention, resume, diffusers' LoRA format, --lora, bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from vidsparse.cli import main
from vidsparse.methods import make_config
from vidsparse.pipelines.offline.shapes import load_shapes_pipeline
from vidsparse.pipelines.training import finetune as F
from vidsparse.pipelines.training import train_tiny
from vidsparse.video_io import read_frames

# 9 frames of 32x32: 5 latent frames x 8 x 8 tokens (4x4 pixels each) = 320 tokens, one block of 64 per latent
# frame: radial at 0.25 keeps a quarter of the block pairs (measured).
GEOMETRY = {"frames": 9, "height": 32, "width": 32}
RADIAL = make_config("radial", density=0.25, dense_layers=0, backend="reference")


def config(**overrides):
    fields = {"sparse": RADIAL, "rank": 4, "alpha": 8.0, "steps": 4, "warmup_steps": 2, **GEOMETRY, **overrides}
    return F.FinetuneConfig(**fields)


def lora_state(folder):
    return torch.load(folder / F.CHECKPOINT_NAME, weights_only=True)["lora"]


def transformer_output(pipe, seed=0):
    """The transformer's output on fixed latents, a fixed timestep and a real (512-token) prompt embedding."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 24, 5, 16, 16, generator=gen)
    with torch.no_grad():
        context, _ = pipe.encode_prompt(
            ["a red circle moves right over a plain gray background"], do_classifier_free_guidance=False
        )
        return pipe.transformer(latents, torch.tensor([600.0]), context, return_dict=False)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four radial steps of a rank-4 adapter (alpha 8, so a lost alpha would show): folder, pipe, summary."""
    out = tmp_path_factory.mktemp("ft") / "run"
    pipe = load_shapes_pipeline()
    summary = F.finetune(out, config(), pipe, progress=False)
    return out, pipe, summary


def test_training_is_sparse_and_changes_the_adapter(trained):
    out, pipe, summary = trained
    assert summary["done"] and summary["step"] == 4
    assert summary["density"] < 0.4  # measured on the training forwards: the mask was applied
    lines = [json.loads(line) for line in (out / F.LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in lines)
    lora = lora_state(out)
    assert len(lora) == 4 * 2 * 4 * 2  # 4 blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0) x (A, B)
    assert all(".to_q." in k or ".to_k." in k or ".to_v." in k or ".to_out.0." in k for k in lora)
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in b)  # B starts at zero: every adapter was trained
    assert pipe.transformer.training is False and not hasattr(pipe.transformer, "_vidsparse_handle")


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(trained, tmp_path):
    straight, _, _ = trained
    out = tmp_path / "run"
    first = F.finetune(out, config(steps=2), load_shapes_pipeline(), progress=False)
    assert first["step"] == 2 and first["done"]
    with pytest.raises(ValueError, match="--resume"):
        F.finetune(out, config(), load_shapes_pipeline(), progress=False)
    resumed = F.finetune(out, config(), load_shapes_pipeline(), resume=True, progress=False)
    assert resumed["step"] == 4
    a, b = lora_state(straight), lora_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (d / F.LOG_NAME).read_text().splitlines()] for d in (straight, out)]
    assert losses[0] == losses[1]


def test_resume_with_other_settings_is_refused(trained):
    out, _, _ = trained
    with pytest.raises(ValueError, match="rank: saved 4, now 8"):
        F.check_run_folder(out, config(rank=8), resume=True)
    assert F.check_run_folder(out, config(steps=10), resume=True)  # more steps: allowed


def test_stock_load_lora_weights_gives_the_trained_model(trained):
    out, pipe, _ = trained
    base = load_shapes_pipeline()
    loaded = load_shapes_pipeline()
    loaded.load_lora_weights(str(out))  # stock diffusers, nothing of vidsparse
    expected, before, got = transformer_output(pipe), transformer_output(base), transformer_output(loaded)
    assert (got - before).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_training_lowers_the_loss_of_a_fixed_clip(tmp_path):
    """A folder of one clip (--data): 12 dense steps lower the loss on it at fixed noise levels."""
    clip = train_tiny.procedural_videos(train_tiny.TrainConfig(height=16, width=16), 0, frames=5, batch=1)[0][0]
    frames = ((clip.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "one.npy", frames)
    (data / "one.txt").write_text("a red circle moves right over a plain gray background\n")
    cfg = F.FinetuneConfig(
        sparse=None, rank=4, steps=12, lr=3e-3, warmup_steps=1, frames=5, height=16, width=16, caption_dropout=0.0
    )
    cfg = dataclasses.replace(cfg, data=str(data))

    def loss(pipe):
        videos, captions = F.ClipFolder(data, 5).batch(0, 0, 1, 16, 16, 0.0)
        latents = train_tiny.encode_videos(pipe, videos).expand(8, -1, -1, -1, -1)
        with torch.no_grad():
            context, _ = pipe.encode_prompt(captions * 8, do_classifier_free_guidance=False)
            return train_tiny.flow_matching_loss(
                pipe.transformer, latents, context, torch.Generator().manual_seed(5), 5.0, "x0"
            ).item()

    pipe = load_shapes_pipeline()
    before = loss(pipe)
    F.finetune(tmp_path / "run", cfg, pipe, progress=False)
    after = loss(pipe)
    print(f"loss on the clip: {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_render_and_eval_use_lora(trained, tmp_path, capsys):
    out, _, _ = trained
    small = ["--frames", "5", "--height", "16", "--width", "16", "--steps", "2"]
    clips = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(out)])):
        path = tmp_path / f"{name}.npy"
        assert main(["render", "--method", "none", *small, "--out", str(path), *extra]) == 0
        clips[name] = read_frames(path).astype(int)
    assert "+ LoRA" in capsys.readouterr().out
    assert np.abs(clips["base"] - clips["lora"]).max() > 0
    r = tmp_path / "r"
    args = ["eval", "--out", str(r), "--methods", "window:window=0", "--lpips", "none", "--quiet", *small]
    assert main([*args, "--lora", str(out), "--prompts", str(prompts_file(tmp_path))]) == 0
    report = json.loads((r / "report.json").read_text())
    jobs = [run["job"] for run in report["runs"]]
    assert len(jobs) == 2 and all(j["lora"] == str(out.resolve()) and len(j["lora_digest"]) == 12 for j in jobs)
    assert "--lora" in report["runs"][0]["command"]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle moves right\n")
    return path


def test_eval_ids_without_lora_are_unchanged():
    from vidsparse.eval.harness import EvalJob

    job = EvalJob("tiny-shapes", 0, "p", 0, 5, 16, 16, 2, 4.0, "float32", "cpu")
    assert "lora" not in job.identity()
    assert EvalJob(**{**job.__dict__, "lora": "/x", "lora_digest": "abc"}).run_id != job.run_id


def test_check_backward_catches_a_failing_or_wrong_executor(monkeypatch):
    from vidsparse.kernels import dispatch

    F.check_backward("reference", torch.device("cpu"))
    real = dispatch.block_sparse_attention

    def fake(q, k, v, plan, *, backend="auto", **kw):
        out = real(q, k, v, plan, backend="reference", **kw)
        if backend == "gather":
            return out.detach()  # no graph: backward fails
        return out * 1.01 if backend == "flex" else out

    monkeypatch.setattr(dispatch, "block_sparse_attention", fake)
    with pytest.raises(ValueError, match="backend='gather' cannot train on cpu: its backward failed"):
        F.check_backward("gather", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='flex' cannot train on cpu: its dq differs"):
        F.check_backward("flex", torch.device("cpu"))


def write_clip(folder, name, frames=5, caption="a red circle moves left"):
    np.save(folder / f"{name}.npy", np.zeros((frames, 16, 16, 3), np.uint8))
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "holds no clip"),
        (lambda d: write_clip(d, "a", caption=None), "clips without a caption file: a.npy"),
        (lambda d: (write_clip(d, "a"), (d / "b.txt").write_text("x")), "captions without a clip: b.txt"),
        (lambda d: write_clip(d, "a", caption="  \n"), "empty caption for a.npy"),
        (lambda d: write_clip(d, "a", frames=3), r"shorter than --frames 5: a.npy \(3\)"),
        (lambda d: ((d / "a.mp4").write_bytes(b"not a video"), (d / "a.txt").write_text("x")), "cannot read"),
    ],
)
def test_bad_data_folders(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message):
        F.ClipFolder(tmp_path, 5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "rank=0"),
        (["--steps", "0"], "--steps: 0 is invalid"),
        (["--lr", "-1"], "lr=-1.0"),
        (["--alpha", "0"], "alpha=0.0"),
        (["--minutes", "0"], "--minutes 0"),
        (["--height", "0"], "--height: 0 is invalid"),
        (["--caption-dropout", "2"], "caption_dropout=2.0"),
        (["--method", "radial", "--dense-steps", "2"], "--dense-steps"),
        (["--backend", "reference"], "needs --method"),
        (["--method", "nosuch"], "nosuch"),
        (["--data", "/nonexistent/clips"], "--data '/nonexistent/clips': no such folder"),
    ],
)
def test_bad_flags_are_one_line_errors_before_loading(tmp_path, capsys, monkeypatch, args, message):
    def no_load(*a, **k):
        raise AssertionError("the model must not load for a bad flag")

    monkeypatch.setattr("vidsparse.commands.finetune.load_pipeline", no_load)
    try:
        code = main(["finetune", str(tmp_path / "run"), *args])
    except SystemExit as exit_:  # argparse's own type checks: usage, then one error line
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_to_mix_runs(trained, capsys, monkeypatch):
    out, _, _ = trained
    monkeypatch.setattr("vidsparse.commands.finetune.load_pipeline", None)
    assert main(["finetune", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["finetune", str(out), "--resume", "--rank", "8"]) == 2
    assert "only --steps may change" in capsys.readouterr().err


def test_cli_minutes_budget_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["finetune", str(out), "--frames", "5", "--height", "16", "--width", "16", "--rank", "2", "--quiet"]
    assert main([*base, "--steps", "50", "--minutes", "1e-6"]) == 0  # the budget ends after the first step
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 1 and not summary["done"]
    assert (out / F.LORA_WEIGHT_NAME).is_file() and not (out / ".lora-tmp").exists()
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary file
    assert main([*base, "--steps", "2", "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["done"]
    assert [json.loads(line)["step"] for line in (out / F.LOG_NAME).read_text().splitlines()] == [1, 2]


def test_ctrl_c_keeps_the_steps_done_and_resume_ends_like_an_uninterrupted_run(trained, tmp_path):
    """Ctrl-C between checkpoints writes one; a run killed after its checkpoint left log lines of steps it will redo:
    the resumed run drops them, so the log and the adapter equal an uninterrupted run's."""
    straight, _, _ = trained
    out = tmp_path / "run"

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        F.finetune(out, config(checkpoint_every_s=1e9), load_shapes_pipeline(), progress=False, on_step=interrupt)
    assert torch.load(out / F.CHECKPOINT_NAME, weights_only=True)["step"] == 3  # the steps after the start were kept
    with (out / F.LOG_NAME).open("a") as log:  # as if killed during step 4, after logging it, before a checkpoint
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    F.finetune(out, config(), load_shapes_pipeline(), resume=True, progress=False)
    records = [json.loads(line) for line in (out / F.LOG_NAME).read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / F.LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]
    a, b = lora_state(straight), lora_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_ctrl_c_is_one_message_with_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vidsparse.commands.finetune.load_pipeline", interrupted)
    assert main(["finetune", str(tmp_path / "run"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted; the last checkpoint in" in err and "--resume" in err


@pytest.mark.parametrize("command", [["render"], ["eval", "--out", "r"]])
def test_lora_flag_without_weights_is_one_line_error(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--lora", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--lora '{tmp_path}' holds no {F.LORA_WEIGHT_NAME}" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_geometry_the_model_cannot_encode_is_refused(tmp_path):
    pipe = load_shapes_pipeline()
    with pytest.raises(ValueError, match=r"--frames 8 is invalid for this model: frames must be 2\*k \+ 1"):
        F.finetune(tmp_path, config(frames=8), pipe, progress=False)
    # A token of the shapes model covers 4x4 pixels (pixel-shuffle VAE x2, patch 2).
    F.check_geometry(pipe, config(height=36, width=20))
    with pytest.raises(ValueError, match="--width 42 is invalid for this model: expected a multiple of 4 pixels"):
        F.check_geometry(pipe, config(width=42))
    assert not list(tmp_path.iterdir())
