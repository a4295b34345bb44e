"""Every diffusers video model family, through one parametrised suite (in the spirit of diffusers' tester mixins).

For each family's tiny pipeline: ``apply(pipe, "dense")`` equals the stock output (fp32, 1e-5) with exactly the
family's video self-attention modules replaced, step counting per cache context (split vs batched CFG), the reset at
the end of a generation, and ``remove()`` restoring the very same processor objects; then every registered method
(``vidsparse.method_names()``: new methods join automatically) runs a full tiny generation with the options of
:func:`vidsparse.pipelines.support.tiny_method_config`, sparse on every call, at a measured density near its target.
Family-specific tests follow: padded text masks, SkyReels-V2's block-causal mask, Wan 2.1 I2V's image branch,
CogVideoX 1.5's temporal patch, LTX's grid from forward arguments, the ``models`` and ``render`` commands.

The executor is ``reference`` (the specification; no compile per shape) unless ``VIDSPARSE_TEST_BACKEND`` says
otherwise; two tests run the real pipelines' masks through ``flex`` too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import vidsparse
from vidsparse.cli import main
from vidsparse.integration import transformers_of
from vidsparse.methods import method_names
from vidsparse.pipelines import base, hunyuan_video
from vidsparse.pipelines.offline import tiny
from vidsparse.pipelines.registry import adapter_for
from vidsparse.pipelines.support import check_support, generate, tiny_method_config
from vidsparse.pipelines.wan import WanSparseAttnProcessor

BACKEND = os.environ.get("VIDSPARSE_TEST_BACKEND", "reference")
STEPS = 2

#: Two prompts of different lengths in one batch: the text padding differs per sample.
MIXED_PROMPTS = dict(
    prompt=["a red circle", "a big blue square moves left slowly over the sea"], negative_prompt=["", "dark"]
)

#: The suite's pipelines and their generation arguments. Every geometry gives several 64-token blocks per attention
#: call and a video token count that is not a multiple of the block (440 = 5x8x11, 480 = 5x8x12; the others are the
#: tiny specs' defaults).
CASES: dict[str, dict[str, Any]] = {
    "wan": dict(frames=17, height=128, width=176),
    "wan2.2": dict(frames=17, height=128, width=176),
    "skyreels_v2": {},
    "cogvideox": {},
    "hunyuan_video": dict(true_cfg_scale=2.0),  # true CFG: split cond / uncond calls
    "hunyuan_video_1.5": {},
    "ltx": {},
    "mochi": {},
}
#: Joint-attention families: the exactness test runs them on two prompts of different lengths (per-sample padding).
JOINT = {"cogvideox", "hunyuan_video", "hunyuan_video_1.5", "mochi"}
#: Families whose stock output is re-generated after ``remove()`` (the processors' identity is checked for all):
#: Mochi (processors assigned per module, no ``set_processor``) and Wan 2.2 (two transformers).
RERUN_AFTER_REMOVE = {"mochi", "wan2.2"}


def dense_case(name: str) -> dict[str, Any]:
    """Generation arguments of the exactness test: mixed prompt lengths for the joint families."""
    return CASES[name] | (MIXED_PROMPTS if name in JOINT else {})


SPARSE_METHODS = [m for m in method_names() if m != "dense"]  # dense: the exactness test below


class Prepared:
    """Tiny pipelines built once per module, with their stock outputs."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], Any] = {}

    def pipe(self, name: str):
        key = ("pipe", name)
        if key not in self.cache:
            p = tiny.build(name)
            p.set_progress_bar_config(disable=True)
            self.cache[key] = p
        return self.cache[key]

    def stock(self, name: str, **kw: Any) -> torch.Tensor:
        """Stock output of ``name`` with its :data:`CASES` arguments updated by ``kw``."""
        kw = CASES.get(name, {}) | kw
        key = ("stock", name + json.dumps(kw, sort_keys=True, default=str))
        if key not in self.cache:
            self.cache[key] = generate(self.pipe(name), tiny.get_spec(name), steps=STEPS, **kw)
        return self.cache[key]


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    return Prepared()


def processors(transformer: torch.nn.Module) -> dict[str, Any]:
    """Every attention processor of a transformer by module name (modules with a ``processor``, Mochi's included)."""
    return {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "processor")}


def assert_step_counting(rows: list[dict], contexts: tuple[str, ...], modules_per_model: list[int]) -> None:
    """Each context counts STEPS steps; at every step each layer of the running model is called exactly once."""
    assert {r["context"] for r in rows} == set(contexts)
    for context in contexts:
        calls = [(r["model"], r["layer"], r["step"]) for r in rows if r["context"] == context]
        assert len(calls) == len(set(calls)), f"{context}: a layer was called twice in one step"
        steps = sorted({step for _, _, step in calls})
        assert steps == list(range(STEPS)), (context, steps)
        for step in steps:
            models = {m for m, _, s in calls if s == step}
            assert len(models) == 1  # one expert per step (Wan 2.2), and the count continues across experts
            (model,) = models
            assert sorted(layer for m, layer, s in calls if s == step) == list(range(modules_per_model[model]))


# ------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("name", list(CASES))
def test_dense_equals_stock_counts_steps_and_remove_restores(prepared, name):
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    case = dense_case(name)
    stock = prepared.stock(name, **case)
    adapter = adapter_for(pipe.transformer)
    transformers = transformers_of(pipe)
    before = [processors(t) for t in transformers]

    handle = vidsparse.apply(pipe, "dense", backend=BACKEND)
    for t, old in zip(transformers, before):
        targets = {n for n, _, _ in adapter.attention_modules(t)}
        assert targets and targets <= set(old)
        for module_name, proc in processors(t).items():
            if module_name in targets:
                assert isinstance(proc, adapter.processor_cls), module_name
            else:  # cross-attention, token refiner, VAE: untouched
                assert proc is old[module_name], module_name
    out = generate(pipe, spec, steps=STEPS, **case)
    rows = handle.stats()
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    assert rows and all(r["sparse"] and r["density"] == pytest.approx(1.0) for r in rows)
    assert_step_counting(rows, adapter.cfg_contexts, [len(adapter.attention_modules(t)) for t in transformers])
    # The pipeline reset the root hook at the end of the generation (maybe_free_model_hooks -> reset_state).
    assert handle.runtime.state_manager._state_cache == {} and handle.runtime.current is None

    handle.remove()
    for t, old in zip(transformers, before):
        now = processors(t)
        assert now.keys() == old.keys() and all(now[k] is old[k] for k in old)
        assert t._diffusers_hook.get_hook("vidsparse") is None and not hasattr(t, "_vidsparse_handle")
        assert not any(hasattr(m, "_vidsparse_runtime") for m in t.modules())
    if name in RERUN_AFTER_REMOVE:
        assert torch.equal(generate(pipe, spec, steps=STEPS, **case), stock)


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_method_runs_full_generation_near_target_density(prepared, name, method):
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    config = tiny_method_config(method, backend=BACKEND)
    result, out, rows = check_support(pipe, spec, config, steps=STEPS, **CASES[name])
    assert result.ok, result.error
    assert result.sparse_calls == result.calls > 0  # no warm-up in the tiny configs: every call is sparse
    adapter = adapter_for(pipe.transformer)
    transformers = transformers_of(pipe)
    assert_step_counting(rows, adapter.cfg_contexts, [len(adapter.attention_modules(t)) for t in transformers])
    if result.density < 1.0:  # a pattern that drops blocks must change a random-weight model's output
        assert (out - prepared.stock(name)).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------------ text masks
def test_padding_mask_is_what_makes_joint_attention_exact(prepared, monkeypatch):
    """Dropping HunyuanVideo's text padding mask from the sparse path changes the output: the exactness of the
    dense test above (prompts of different lengths in one batch) depends on the mask being ANDed."""
    name = "hunyuan_video"
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    monkeypatch.setattr(hunyuan_video, "sequence_validity", lambda mask, batch, seq_len: None)
    with vidsparse.apply(pipe, "dense", backend=BACKEND):
        unmasked = generate(pipe, spec, steps=STEPS, **dense_case(name))
    assert (unmasked - prepared.stock(name, **dense_case(name))).abs().max() > 1e-3


def test_sequence_validity_forms():
    full = torch.tensor([[True, True, True, False]])
    assert torch.equal(base.sequence_validity(full[:, None, None], 1, 4), full)  # HunyuanVideo [B, 1, 1, S]
    text = torch.tensor([[1, 0], [1, 1]])  # HunyuanVideo 1.5 / Mochi: text only, video in front
    assert base.sequence_validity(text, 2, 5).tolist() == [[True] * 3 + [True, False], [True] * 5]
    with pytest.raises(ValueError, match="not a key padding mask"):
        base.sequence_validity(torch.ones(1, 1, 4, 4, dtype=torch.bool), 1, 4)


# -------------------------------------------------------------------------------- SkyReels-V2 diffusion forcing
def test_causal_groups_from_mask_recognises_block_causal_masks_only():
    frames = torch.arange(6).repeat_interleave(4)  # 6 frames of 4 tokens, blocks of 2 frames
    block = frames // 2
    mask = (block[None, :] <= block[:, None])[None, None]
    groups = base.causal_groups_from_mask(mask, 24)
    assert groups is not None and torch.equal(groups[0][None, :] <= groups[0][:, None], mask[0, 0])
    assert base.causal_groups_from_mask(mask.clone(), 24) is not None  # a new tensor is analysed again
    bad = mask.clone()
    bad[0, 0, 3, 20] = True  # one extra visible key: no longer block-causal
    assert base.causal_groups_from_mask(bad, 24) is None


def test_skyreels_diffusion_forcing_mask_is_anded(prepared):
    name = "skyreels_v2_df"
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    stock = prepared.stock(name)
    # The mask matters: without it (one frame per causal block) the same model gives another result.
    assert (generate(pipe, spec, steps=STEPS, causal_block_size=1) - stock).abs().max() > 1e-3
    with vidsparse.apply(pipe, "dense", backend=BACKEND) as handle:
        out = generate(pipe, spec, steps=STEPS)
        rows = handle.stats()
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    assert rows and all(r["sparse"] for r in rows)  # the mask was turned into causal groups, never dense fallback
    result, _, _ = check_support(pipe, spec, tiny_method_config("window", backend=BACKEND), steps=STEPS)
    assert result.ok and result.sparse_calls == result.calls, result.error


@pytest.mark.parametrize("name", ["hunyuan_video", "skyreels_v2_df"])
def test_flex_executor_with_the_models_masks(prepared, name):
    """Key padding (HunyuanVideo, mixed prompt lengths) and block-causal groups (SkyReels-V2 DF) through flex."""
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    case = dense_case(name) if name in CASES else {}
    with vidsparse.apply(pipe, "dense", backend="flex"):
        out = generate(pipe, spec, steps=STEPS, **case)
    torch.testing.assert_close(out, prepared.stock(name, **case), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- other family specifics
def test_wan21_i2v_image_branch_stays_stock(prepared):
    name = "wan_i2v"
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    geometry = dict(frames=5, height=128, width=176)  # 2 x 8 x 11 video tokens
    stock = prepared.stock(name, **geometry)
    block = pipe.transformer.blocks[0]
    assert block.attn2.add_k_proj is not None  # the CLIP image tokens' own keys/values
    attn2 = [b.attn2.processor for b in pipe.transformer.blocks]
    with vidsparse.apply(pipe, "dense", backend=BACKEND) as handle:
        assert [b.attn2.processor for b in pipe.transformer.blocks] == attn2
        assert all(isinstance(b.attn1.processor, WanSparseAttnProcessor) for b in pipe.transformer.blocks)
        out = generate(pipe, spec, steps=STEPS, **geometry)
        rows = handle.stats()
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)
    assert {r["tokens"] for r in rows} == {2 * 8 * 11} and all(r["sparse"] for r in rows)


def test_cogvideox15_temporal_patch_grid(prepared):
    name = "cogvideox_1.5"
    pipe, spec = prepared.pipe(name), tiny.get_spec(name)
    with vidsparse.apply(pipe, "dense", backend=BACKEND) as handle:
        out = generate(pipe, spec, steps=STEPS)
        rows = handle.stats()
    torch.testing.assert_close(out, prepared.stock(name), atol=1e-5, rtol=1e-5)
    # 25 frames -> 7 latent frames, padded by the pipeline to 8 -> 4 temporal patches of 2; 128 x 176 -> 8 x 11.
    assert {r["tokens"] for r in rows} == {4 * 8 * 11} and all(r["sparse"] for r in rows)


def test_ltx_grid_comes_from_forward_arguments(prepared):
    pipe = prepared.pipe("ltx")
    adapter = adapter_for(pipe.transformer)
    packed = torch.zeros(1, 480, 8)  # [B, S, C]: the shape alone says nothing about the grid
    assert adapter.grid_from_forward(pipe.transformer, (packed,), {"num_frames": 5, "height": 8, "width": 12}) == (
        5,
        8,
        12,
    )
    assert adapter.grid_from_forward(pipe.transformer, (packed,), {}) is None


# ------------------------------------------------------------------------------------------------- commands
def test_models_listing_and_json(capsys):
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    families = {f["family"]: f for f in info["families"]}
    assert set(families) == {"wan", "skyreels_v2", "cogvideox", "hunyuan_video", "hunyuan_video_1.5", "ltx", "mochi"}
    assert families["hunyuan_video"]["attention_modules"] == [
        "transformer_blocks.*.attn",
        "single_transformer_blocks.*.attn",
    ]
    assert families["cogvideox"]["text_position"] == "before"
    for required in ("wan", "wan2.2", "cogvideox", "hunyuan_video", "hunyuan_video_1.5", "ltx", "mochi", "skyreels_v2"):
        assert any(t["name"] == required for t in info["tiny_pipelines"])
    assert [m["name"] for m in info["methods"]] == method_names()
    assert main(["models"]) == 0
    assert "tiny-mochi" in capsys.readouterr().out


def test_models_markdown_matrix_is_measured(capsys, tmp_path):
    path = tmp_path / "matrix.json"
    code = main(
        [
            "models",
            "--markdown",
            "--tiny",
            "ltx",
            "--method",
            "window",
            "--steps",
            "1",
            "--backend",
            "reference",
            "--results-json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| family | tiny pipeline | window |" in out
    (row,) = json.loads(path.read_text())
    assert row["ok"] and row["sparse_calls"] == row["calls"] == 2  # 1 step x batched CFG x 2 layers
    assert f"| ltx | tiny-ltx | ✓ {row['density']:.2f} |" in out
    assert main(["models", "--markdown", "--tiny", "nope"]) == 2
    assert "tiny pipeline 'nope' is unknown" in capsys.readouterr().err


def test_render_tiny_ltx(tmp_path, capsys):
    from vidsparse.video_io import read_frames

    out = tmp_path / "ltx.mp4"
    code = main(["render", "--model", "tiny-ltx", "--steps", "1", "--method", "window", "--out", str(out)])
    assert code == 0
    spec = tiny.get_spec("ltx")
    assert read_frames(out).shape == (spec.frames, spec.height, spec.width, 3)
    assert "2/2 self-attention calls sparse" in capsys.readouterr().out
