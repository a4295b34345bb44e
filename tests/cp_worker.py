"""Context parallelism in 2 processes (gloo, CPU): what tests/test_context_parallel.py checks.

Run by the test as ``python -m torch.distributed.run --nproc_per_node 2 tests/cp_worker.py OUT.pt``; rank 0 saves
every output and error message to OUT.pt and the test compares them with one process (:func:`single_process`,
the same code without ``enable_parallelism``). Also importable: the test uses its helpers and the ``headwise`` test
method.

diffusers' ``enable_parallelism`` picks a device with ``rank % torch.accelerator.device_count()``, which is a
division by zero on a machine without an accelerator: :func:`allow_cpu_context_parallel` makes the count 1 there.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

import vidsparse
import vidsparse.methods as registry
from vidsparse.config import SparseConfig
from vidsparse.pipelines.offline import tiny
from vidsparse.plan import finalize_plan, num_blocks

# 17 frames x 128 x 192 px -> 5 x 8 x 12 = 480 latent tokens (8 blocks of 64), split 240 / 240 over 2 ranks.
GEOMETRY = dict(num_frames=17, height=128, width=192)
STEPS = 2
#: Per-head planning from q/k (each rank plans its own head), through the default executor (flex on CPU); layer 0
#: stays dense, through the stock dispatch inside the vidsparse processor.
MOBA = dict(selection="topk", density=0.5, dense_steps=0, dense_layers=1)
#: A plan made for all heads of the layer (head 0 frame-local, head 1 dense): the runtime cuts it per rank.
HEADWISE = dict(backend="reference", dense_steps=0)


@dataclass(frozen=True)
class HeadwiseConfig(SparseConfig):
    """Test method: head 0 keeps only each query block's own block, every other head keeps everything."""

    method: ClassVar[str] = "headwise"


def headwise_plan(q, k, layout, config, ctx):
    """A plan with one row per head of the layer (``ctx.num_heads``), whatever heads q holds."""
    vb = num_blocks(layout.num_video_tokens, config.block_size)
    mask = torch.ones(1, ctx.num_heads, vb, vb, dtype=torch.bool)
    mask[0, 0] = torch.eye(vb, dtype=torch.bool)
    return finalize_plan(mask, layout, config.block_size)


METHOD = registry.MethodSpec(
    "headwise", HeadwiseConfig, headwise_plan, static=False, summary="test: a plan per head of the layer"
)


@contextlib.contextmanager
def headwise_registered():
    """Make ``headwise`` a method name while inside (registers this module's ``METHOD``)."""
    registry.register_method(METHOD)
    try:
        yield
    finally:
        registry.unregister_method("headwise")


def allow_cpu_context_parallel() -> None:
    """Let diffusers' ``enable_parallelism`` run on a machine without accelerator (see the module docstring)."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def build_pipe():
    """The tiny Wan pipeline (deterministic weights), without progress bars."""
    pipe = tiny.build("wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, geometry=GEOMETRY) -> torch.Tensor:
    """Latents of one 2-step generation with split CFG, seed 0."""
    return pipe(
        prompt="a red circle moves left",
        negative_prompt="",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **geometry,
    ).frames


def single_process() -> dict[str, torch.Tensor]:
    """The outputs the 2-process run must reproduce, computed in one process."""
    pipe = build_pipe()
    out = {"stock": generate(pipe)}
    with headwise_registered():
        for name, options in (("moba", MOBA), ("headwise", HEADWISE)):
            with vidsparse.apply(pipe, name, **options):
                out[name] = generate(pipe)
    return out


def ulysses_case(parallel_config, *, seq_len: int, heads: int, seed: int) -> dict[str, float]:
    """``ulysses_attention`` on random tensors with a per-head plan and padded keys, against one process."""
    from helpers import qkv, random_plan

    from vidsparse.kernels.dispatch import block_sparse_attention
    from vidsparse.pipelines.parallel import ulysses_attention

    cp = parallel_config.context_parallel_config
    q, k, v = qkv(1, seq_len, heads, 16, seed=seed)
    plan = random_plan(seq_len, 64, h=heads, density=0.3, seed=seed)
    padding = torch.ones(1, seq_len, dtype=torch.bool)
    padding[:, -5:] = False
    expected = block_sparse_attention(q, k, v, plan, backend="reference", key_padding_mask=padding)

    rank, world = cp._flattened_mesh.get_local_rank(), cp.ulysses_degree

    def chunk(x):  # this rank's sequence shard, as diffusers splits it (equal chunks when the length divides)
        return x.tensor_split(world, dim=1)[rank]

    seen = []

    def attend(q_, k_, v_, mask, head_offset, num_heads):
        seen.append((head_offset, q_.shape[2], q_.shape[1]))
        sub = plan.select_heads(head_offset, head_offset + q_.shape[2])
        return block_sparse_attention(q_, k_, v_, sub, backend="reference", key_padding_mask=mask)

    out = ulysses_attention(chunk(q), chunk(k), chunk(v), attend, parallel_config, key_padding_mask=chunk(padding))
    return {"max_diff": float((out - chunk(expected)).abs().max()), "seen": seen}


def _error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def scenarios(rank: int) -> dict:
    """Every context-parallel scenario, in this process (one of 2): outputs, statistics and error messages."""
    from diffusers import ContextParallelConfig, ParallelConfig
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel

    from vidsparse.pipelines.wan import WanSparseAttnProcessor

    ulysses = ContextParallelConfig(ulysses_degree=2)
    results: dict = {}

    # A: enable_parallelism, then apply (the processor copies the config from the one it replaces).
    pipe = build_pipe()
    pipe.transformer.enable_parallelism(config=ulysses)
    with vidsparse.apply(pipe, "moba", **MOBA) as handle:
        results["moba"] = generate(pipe)
        results["moba_stats"] = handle.stats()
    results["stock"] = generate(pipe)  # stock processors back, still context parallel
    results["stock_restored"] = type(pipe.transformer.blocks[0].attn1.processor) is WanAttnProcessor

    # A': processors installed by hand after enable_parallelism have no parallel config: they adopt the model's.
    before = dict(pipe.transformer.attn_processors)
    proc = vidsparse.make_processor(pipe.transformer, "headwise", **HEADWISE)
    pipe.transformer.set_attn_processor(proc)
    results["adopt_before"] = proc._parallel_config is None
    with vidsparse.attach(pipe) as handle:
        results["headwise_adopted"] = generate(pipe)
    results["adopt_after"] = proc._parallel_config is pipe.transformer._parallel_config
    pipe.transformer.set_attn_processor(before)

    # B: apply, then enable_parallelism (diffusers reaches our processors; remove() hands the config back).
    pipe_b = build_pipe()
    handle = vidsparse.apply(pipe_b, "headwise", **HEADWISE)
    pipe_b.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    processor = pipe_b.transformer.blocks[0].attn1.processor
    results["b_reached"] = isinstance(processor, WanSparseAttnProcessor) and processor._parallel_config is not None
    results["headwise"] = generate(pipe_b)
    results["headwise_stats"] = handle.stats()
    handle.remove()
    results["stock_b"] = generate(pipe_b)

    # C: ring attention is refused, in either order.
    config = dict(pipe.transformer.config)
    ring = WanTransformer3DModel.from_config(config)
    ring.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    results["ring_apply_error"] = _error_of(lambda: vidsparse.apply(ring, "headwise"))
    ring_late = WanTransformer3DModel.from_config(config)
    vidsparse.apply(ring_late, "headwise")
    ring_late.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 8, config["text_dim"]),
        return_dict=False,
    )
    with torch.no_grad():
        results["ring_call_error"] = _error_of(lambda: ring_late(**inputs))

    # D: the Ulysses forward op on raw tensors: head offsets, padded keys, and with ulysses_anything uneven heads and
    # sequence (end to end, an uneven sequence cannot run here: diffusers gathers the output with an all_gather of
    # unequal shards, which gloo refuses).
    results["ulysses_even"] = ulysses_case(pipe.transformer._parallel_config, seq_len=256, heads=2, seed=1)
    anything = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1, 2), mesh_dim_names=("ring", "ulysses"))
    anything.setup(rank, 2, torch.device("cpu"), mesh=mesh)
    results["ulysses_anything"] = ulysses_case(anything, seq_len=131, heads=3, seed=2)
    return results


def main(out_path: str) -> None:
    """Run :func:`scenarios` in each process; rank 0 saves the results (and both ranks' statistics)."""
    import torch.distributed as dist

    allow_cpu_context_parallel()
    # "cpu:gloo", not "gloo": diffusers' ulysses_anything picks the device of its size exchange from this name.
    dist.init_process_group("cpu:gloo")
    rank = dist.get_rank()
    with headwise_registered():
        results = scenarios(rank)
    gathered = [None, None]
    dist.all_gather_object(gathered, {k: v for k, v in results.items() if not isinstance(v, torch.Tensor)})
    if rank == 0:
        results["per_rank"] = gathered
        torch.save(results, out_path)
    # Both ranks leave together: no rank tears gloo down while the other may still be in a collective.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
