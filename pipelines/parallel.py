"""One replica across several devices: sequence parallel (Ulysses) and CFG parallel for Kandinsky 5; CFG parallel
for Kandinsky 6 (`K6GangRenderer`).

Every rank of a gang runs the real pipeline `__call__` on the same request and the same CPU-seeded
latents. Parallelism is applied from outside, as diffusers intends:
- Sequence parallel: diffusers' context parallelism with a Kandinsky 5 split/gather plan (the model
  ships none). The visual tokens and their rope are split across the ranks at
  the visual blocks; the text blocks (a few hundred tokens) run whole on every rank.
- CFG parallel: the pipeline calls the transformer twice per step (cond, then uncond). The two CFG
  ranks each compute one branch on the first call and exchange results, so the second call is free
  (`pipelines.guidance.GuidedSteps`).
Rank 0 alone holds the text encoders (encoding once, then broadcasting the embeddings) and the VAE
(decoding once); the other ranks load only the transformer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from pipelines.nabla import use_ulysses_processors
from pipelines.render import Renderer
from pipelines.render_common import TEXT_COMPONENTS
from pipelines.request import RenderOptions, RenderRequest
from pipelines.shape import ParallelSpec


def kandinsky5_cp_plan(num_visual_blocks: int) -> dict:
    """Split visual tokens and visual rope at the visual blocks; gather after the last.

    `visual_embed` is split once (at block 0; later blocks receive block outputs, already split);
    `rope` comes from the model's forward to every block, so every block splits it. The text stays
    whole: cross-attention takes each rank's head slice of it (`pipelines.nabla.UlyssesAttnProcessor`).
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "visual_transformer_blocks.0": {"visual_embed": ContextParallelInput(split_dim=1, expected_dims=3)},
        "visual_transformer_blocks.*": {"rope": ContextParallelInput(split_dim=1)},
        f"visual_transformer_blocks.{num_visual_blocks - 1}": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def init_gang(rank: int, world_size: int, address: str, port: int, device: str, timeout_s: float = 600) -> None:
    """Join the gang's process group: NCCL for CUDA tensors, gloo for CPU ones (sizes, objects)."""
    import datetime

    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "cpu:gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


@contextmanager
def _cpu_device_count():
    """diffusers places a rank on `rank % torch.accelerator.device_count()`, which is 0 on a CPU host."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


class GangRenderer(Renderer):
    """One rank of a gang. Every rank calls `render` with the same request; rank 0 returns the frames."""

    def __init__(self, model_path: str, spec: ParallelSpec, rank: int, *, device: str | None = None,
                 storage_options: dict | None = None, options: RenderOptions = RenderOptions()):
        from diffusers.models._modeling_parallel import ContextParallelConfig

        started = time.perf_counter()
        self.spec, self.rank = spec, rank
        # Only rank 0 encodes text and decodes video: the others skip the 7 B Qwen, CLIP and the VAE.
        skip = () if rank == 0 else (*TEXT_COMPONENTS, "vae")
        super().__init__(model_path, device=device, storage_options=storage_options, options=options, skip=skip)
        self.writer = rank == 0
        mesh = dist.device_mesh.init_device_mesh(
            "cuda" if self.device.startswith("cuda") else "cpu", (2 if spec.cfg else 1, spec.ring, spec.ulysses),
            mesh_dim_names=("cfg", "ring", "ulysses"))
        transformer = self.pipe.transformer
        if spec.sequence > 1:
            config = ContextParallelConfig(
                ulysses_degree=spec.ulysses, ring_degree=spec.ring, mesh=mesh["ring", "ulysses"],
                # Text and visual lengths need not divide the degree (heads must: checked up front).
                ulysses_anything=spec.ulysses > 1 and spec.ring == 1, ring_anything=spec.ring > 1 and spec.ulysses == 1,
            )
            with _cpu_device_count():
                transformer.enable_parallelism(
                    config=config, cp_plan=kandinsky5_cp_plan(len(transformer.visual_transformer_blocks)))
            use_ulysses_processors(transformer, mesh["ulysses"].get_group(),
                                   nabla=transformer.attention_type == "nabla")
        if spec.cfg:
            self.apply_options(exchange_group=mesh["cfg"].get_group(), branch=mesh["cfg"].get_local_rank())
        else:
            self.apply_options()
        self.load_seconds = time.perf_counter() - started

    def embeddings(self, request: RenderRequest) -> dict:
        """Rank 0 encodes prompt and negative prompt (once per replica); every rank receives the same tensors."""
        payload = [{k: v.cpu() for k, v in super().embeddings(request).items()} if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        return {k: v.to(self.device) for k, v in payload[0].items()}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class K6GangRenderer:
    """One rank of a Kandinsky 6 CFG-parallel gang: two ranks, each computing one branch of every guided step.

    Every rank runs the plain pipeline call on the same request (the same CPU-seeded video and audio noise); the
    transformer's two calls per step become one per rank and an all-gather of the (video, audio) predictions. The
    uncond inputs are the pipeline's own negative embeddings and padding mask, taken from its `encode_prompt` as it
    runs: `__call__` accepts embeddings but no masks, so they cannot be passed in from outside. So every rank encodes
    the prompts and decodes (unlike the Kandinsky 5 plan, where rank 0 alone does); rank 0 returns the clip.
    Sequence parallel is not offered (`kandinsky_batch.intake.routing.check_shapes` says why).
    """

    def __init__(self, model_path: str, spec: ParallelSpec, rank: int, *, device: str | None = None,
                 storage_options: dict | None = None, options: RenderOptions = RenderOptions()):
        from pipelines.guidance import GuidedSteps
        from pipelines.render_k6 import K6Renderer

        if spec.sequence > 1 or not spec.cfg or spec.world_size != 2:
            raise ValueError(f"gang {spec.name}: Kandinsky 6 runs CFG parallel on two ranks only")
        started = time.perf_counter()
        self.spec, self.rank = spec, rank
        self.inner = K6Renderer(model_path, device=device, storage_options=storage_options, options=options)
        self.inner.apply_options()
        self.device, self.options, self.writer = self.inner.device, options, rank == 0
        self.steps = GuidedSteps(self.inner.pipe.transformer, exchange_group=dist.new_group([0, 1]), branch=rank)
        encode = self.inner.pipe.encode_prompt

        def encode_and_arm(*args, **kwargs):
            out = encode(*args, **kwargs)
            guided = kwargs.get("do_classifier_free_guidance", True)
            self.steps.arm({"encoder_hidden_states": out[3], "pooled_projections": out[4],
                            "encoder_attention_mask": out[5]} if guided else None)
            return out

        self.inner.pipe.encode_prompt = encode_and_arm
        self.load_seconds = time.perf_counter() - started

    def check(self, request: RenderRequest) -> None:
        self.inner.check(request)

    def render(self, request: RenderRequest):
        """The clip on rank 0 (None on rank 1), per the single-device seed contract."""
        clip = self.inner.render(request)
        return clip if self.writer else None

    def render_batch(self, requests: list[RenderRequest]) -> list:
        return [self.render(r) for r in requests]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def open_gang(model_path: str, spec: ParallelSpec, rank: int, **kwargs):
    """This rank's renderer of a gang, the kind's (`Kind.gang`): the Kandinsky 5 plan, or CFG parallel for Kandinsky 6."""
    from pipelines.kinds import UnsupportedModel, kind_of, load
    from pipelines.resolve import resolve_model

    kind = kind_of(resolve_model(model_path, kwargs.get("storage_options"), spec_only=True))
    if kind.gang is None:
        raise UnsupportedModel(f"{model_path!r} is a {kind.name} model: {kind.no_gangs} (no gangs)")
    return load(kind.gang)(model_path, spec, rank, **kwargs)
