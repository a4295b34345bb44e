"""vidsparse on the tiny Wan pipelines: exactness of the dense path, install/remove, step counting, errors."""

import pytest
import torch

import vidsparse
from vidsparse.pipelines.offline import tiny
from vidsparse.pipelines.wan import WanSparseAttnProcessor

# 17 frames x 128 x 192 px -> latent 5 x 16 x 24 -> 5 x 8 x 12 = 480 tokens: 8 blocks of 64, the last one partial.
GEOMETRY = dict(num_frames=17, height=128, width=192)
PROMPT = "a red circle moves left"


def run(pipe, steps=3, guidance=5.0, seed=0, **kw):
    args = dict(
        prompt=PROMPT,
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **GEOMETRY,
    )
    args.update(kw)
    return pipe(**args).frames


@pytest.fixture(scope="module")
def pipe():
    p = tiny.build("wan")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stock_latents(pipe):
    return run(pipe)


def test_dense_equals_stock_and_remove_restores(pipe, stock_latents):
    before = dict(pipe.transformer.attn_processors)
    handle = vidsparse.apply(pipe, "dense")
    assert isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)
    assert not isinstance(pipe.transformer.blocks[0].attn2.processor, WanSparseAttnProcessor)  # cross stays stock
    out = run(pipe)
    summary = handle.summary()
    assert summary["sparse_calls"] == 3 * 2 * 2  # steps x (cond, uncond) x layers, all through the executor
    assert summary["sparse_density"] == pytest.approx(1.0)
    torch.testing.assert_close(out, stock_latents, atol=1e-5, rtol=1e-5)
    handle.remove()
    after = pipe.transformer.attn_processors
    assert all(after[name] is proc for name, proc in before.items())
    assert not hasattr(pipe.transformer.blocks[0].attn1, "_vidsparse_runtime")
    torch.testing.assert_close(run(pipe), stock_latents, atol=0, rtol=0)


def test_sparse_method_runs_and_changes_output(pipe, stock_latents):
    with vidsparse.apply(pipe, "window", window=0) as handle:
        out = run(pipe)
        rows = handle.stats()
    assert torch.isfinite(out).all()
    assert (out - stock_latents).abs().max() > 1e-4
    sparse = [r for r in rows if r["sparse"]]
    assert sparse and all(r["density"] < 0.5 for r in sparse) and all(r["tokens"] == 480 for r in sparse)


def _steps(rows, context, model=0, layer=0):
    return [r["step"] for r in rows if r["context"] == context and r["model"] == model and r["layer"] == layer]


def test_split_cfg_counts_cond_and_uncond_separately_and_resets(pipe):
    with vidsparse.apply(pipe, "dense") as handle:
        run(pipe, steps=4)
        rows = handle.stats()
        assert _steps(rows, "cond") == [0, 1, 2, 3]
        assert _steps(rows, "uncond") == [0, 1, 2, 3]
        handle.clear_stats()
        run(pipe, steps=2)  # a new generation starts again at step 0
        assert _steps(handle.stats(), "cond") == [0, 1]


def test_no_cfg_counts_only_cond(pipe):
    with vidsparse.apply(pipe, "dense") as handle:
        run(pipe, steps=3, guidance=1.0)
        rows = handle.stats()
    assert _steps(rows, "cond") == [0, 1, 2]
    assert _steps(rows, "uncond") == []


def _direct_inputs(pipe, batch):
    t = pipe.transformer
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, t.config.in_channels, 5, 16, 24, generator=gen)
    text = torch.randn(batch, 8, t.config.text_dim, generator=gen)
    return dict(
        hidden_states=hidden, timestep=torch.full((batch,), 500.0), encoder_hidden_states=text, return_dict=False
    )


def test_batched_cfg_context_and_direct_calls(pipe):
    t = pipe.transformer
    with vidsparse.apply(pipe, "dense", dense_steps=1) as handle:
        with torch.no_grad():
            for _ in range(3):
                with t.cache_context("cond_uncond"):
                    t(**_direct_inputs(pipe, 2))
        rows = handle.stats()
        assert _steps(rows, "cond_uncond") == [0, 1, 2]
        assert [r["sparse"] for r in rows if r["layer"] == 0] == [False, True, True]  # dense_steps=1
        handle.clear_stats()
        handle.reset()
        with torch.no_grad():  # outside any pipeline: context "default", one step per call
            t(**_direct_inputs(pipe, 1))
            t(**_direct_inputs(pipe, 1))
        assert _steps(handle.stats(), "default") == [0, 1]


def test_fractional_dense_steps_and_layers(pipe):
    with vidsparse.apply(pipe, "window", dense_steps=0.5, dense_layers=1, dense_last_steps=1) as handle:
        run(pipe, steps=6)
        rows = [r for r in handle.stats() if r["context"] == "cond"]
    for r in rows:
        expected = r["layer"] >= 1 and 3 <= r["step"] < 5
        assert r["sparse"] == expected, r
    reasons = {r["reason"] for r in rows}
    assert reasons == {"sparse", "dense_steps", "dense_layers", "dense_last_steps"}


def test_dense_above_timestep(pipe):
    with vidsparse.apply(pipe, "window", dense_above_timestep=700) as handle:
        run(pipe, steps=4)
        rows = [r for r in handle.stats() if r["context"] == "cond" and r["layer"] == 0]
    timesteps = pipe.scheduler.timesteps.tolist()
    assert [r["sparse"] for r in rows] == [t <= 700 for t in timesteps]
    assert any(r["sparse"] for r in rows) and not all(r["sparse"] for r in rows)


def test_batch_of_two_videos_dense_equals_stock(pipe):
    stock = run(pipe, steps=2, num_videos_per_prompt=2)
    with vidsparse.apply(pipe, "dense"):
        out = run(pipe, steps=2, num_videos_per_prompt=2)
    assert out.shape[0] == 2
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_odd_geometry_not_a_multiple_of_block(pipe):
    # 13 frames x 80 x 112 px -> 4 x 5 x 7 = 140 tokens (3 blocks, last one 12 tokens)
    geo = dict(num_frames=13, height=80, width=112)
    stock = run(pipe, steps=2, **geo)
    with vidsparse.apply(pipe, "dense") as handle:
        out = run(pipe, steps=2, **geo)
        assert {r["tokens"] for r in handle.stats()} == {140}
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_bf16_dense_close_to_stock_bf16():
    p = tiny.build("wan")
    p.set_progress_bar_config(disable=True)
    p.transformer.to(torch.bfloat16)
    stock = run(p, steps=2)
    with vidsparse.apply(p, "dense"):
        out = run(p, steps=2)
    assert out.dtype == stock.dtype
    # bf16 kernels round differently (flex vs SDPA); over two steps the error stays at bf16 level.
    rel = ((out.float() - stock.float()).norm() / stock.float().norm()).item()
    assert rel < 1e-2, rel


def test_wan22_two_experts_share_step_state():
    p = tiny.build("wan2.2")
    p.set_progress_bar_config(disable=True)
    with vidsparse.apply(p, "dense") as handle:
        assert len(handle.transformers) == 2
        run(p, steps=4)
        rows = handle.stats()
    m0, m1 = _steps(rows, "cond", model=0), _steps(rows, "cond", model=1)
    assert m0 and m1 and m0 + m1 == [0, 1, 2, 3]  # the count continues when the pipeline switches experts


def test_set_attn_processor_with_attach(pipe, stock_latents):
    proc = vidsparse.make_processor(pipe.transformer, "dense")
    before = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(proc)  # one shared instance on every module, cross-attention included
    try:
        # The one message of a processor without its root hook, naming the module and how to install the hook.
        with pytest.raises(
            RuntimeError, match=r"without its root hook on a \w*Attention\w*\. Install it with `vidsparse.apply"
        ):
            run(pipe, steps=1)
        with vidsparse.attach(pipe) as handle:
            out = run(pipe)
            assert handle.summary()["sparse_calls"] == 12
        torch.testing.assert_close(out, stock_latents, atol=1e-5, rtol=1e-5)
    finally:
        pipe.transformer.set_attn_processor(before)


def test_bad_input_errors(pipe):
    with pytest.raises(TypeError, match="transformer"):
        vidsparse.apply(object(), "dense")
    with pytest.raises(TypeError, match="Linear.*WanTransformer3DModel"):
        vidsparse.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match="method='nope'.*available"):
        vidsparse.apply(pipe, "nope")
    with pytest.raises(ValueError, match="density=1.5"):
        vidsparse.apply(pipe, "window", density=1.5)
    with pytest.raises(ValueError, match="block_size=32"):
        vidsparse.apply(pipe, "window", block_size=32)
    with pytest.raises(TypeError, match="no option 'windw'"):
        vidsparse.apply(pipe, "window", windw=2)
    with vidsparse.apply(pipe, "dense"):
        with pytest.raises(RuntimeError, match="already applied"):
            vidsparse.apply(pipe, "dense")
    assert not hasattr(pipe.transformer, "_vidsparse_handle")


class _Interrupt(Exception):
    """Raised from a step callback to interrupt a generation."""


def _raise_at_step(stop: int):
    def callback(pipe, i, t, kwargs):
        if i == stop:
            raise _Interrupt(f"interrupted after step {i}")
        return kwargs

    return callback


def test_failed_generation_does_not_carry_state_into_the_next_call():
    # Issue 23 item 2: an exception mid-generation skips diffusers' end-of-call reset (maybe_free_model_hooks).
    # The runtime must see the next call as a new generation by itself: same seed -> bit-identical output to a
    # clean run on a fresh pipeline (with the counter carried over, the dense warm-up would be skipped).
    options = dict(density=0.3, dense_steps=2)
    clean_pipe = tiny.build("wan")
    clean_pipe.set_progress_bar_config(disable=True)
    with vidsparse.apply(clean_pipe, "radial", **options):
        clean = run(clean_pipe, steps=4)
    pipe = tiny.build("wan")
    pipe.set_progress_bar_config(disable=True)
    with vidsparse.apply(pipe, "radial", **options) as handle:
        with pytest.raises(_Interrupt):
            run(pipe, steps=4, callback_on_step_end=_raise_at_step(2))
        handle.clear_stats()
        again = run(pipe, steps=4)
        assert _steps(handle.stats(), "cond") == [0, 1, 2, 3]
        assert _steps(handle.stats(), "uncond") == [0, 1, 2, 3]
    assert torch.equal(again, clean)


def test_interrupted_direct_call_does_not_leave_its_context_behind(pipe):
    # An exception inside the transformer's forward skips the root hook's post_forward: the "default" context it set
    # must not stay set (it would swallow the next calls' own context handling).
    t = pipe.transformer
    with vidsparse.apply(pipe, "dense") as handle:
        block = t.blocks[0]
        original = block.forward

        def fail(*args, **kwargs):
            raise _Interrupt("boom")

        block.forward = fail
        try:
            with torch.no_grad(), pytest.raises(_Interrupt):
                t(**_direct_inputs(pipe, 1))
        finally:
            block.forward = original
        assert handle.runtime.state_manager._context is not None  # the failed call's context is still set
        handle.clear_stats()
        with torch.no_grad():
            t(**_direct_inputs(pipe, 1))
        assert handle.runtime.state_manager._context is None
        assert _steps(handle.stats(), "default") == [1]  # the failed call was step 0 (no reset was asked for)
        with torch.no_grad(), t.cache_context("cond"):  # a pipeline's context is not taken for a stale one
            t(**_direct_inputs(pipe, 1))
        assert handle.runtime.state_manager._context is None
        assert _steps(handle.stats(), "cond") == [0]
