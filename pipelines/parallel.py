"""One replica across several devices: sequence parallel (Ulysses) and CFG parallel for Kandinsky 5.

Every rank of a gang runs the real pipeline `__call__` on the same request and the same CPU-seeded
latents. Parallelism is applied from outside, as diffusers intends:
- Sequence parallel: diffusers' context parallelism with a Kandinsky 5 split/gather plan (the model
  ships none). The visual tokens, their rope and the text keys/values are split across the ranks at
  the visual blocks; the text blocks (a few hundred tokens) run whole on every rank.
- CFG parallel: the pipeline calls the transformer twice per step (cond, then uncond). The two CFG
  ranks each compute one branch on the first call and exchange results, so the second call is free.
Rank 0 alone holds the text encoders (encoding once, then broadcasting the embeddings) and the VAE
(decoding once); the other ranks load only the transformer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from pipelines.models import resolve_model
from pipelines.render import default_device, to_uint8
from pipelines.request import RenderRequest
from pipelines.shape import ParallelSpec


def kandinsky5_cp_plan(num_visual_blocks: int) -> dict:
    """Split visual tokens, visual rope and text keys/values at the visual blocks; gather after the last.

    `visual_embed` is split once (at block 0; later blocks receive block outputs, already split);
    `text_embed` and `rope` come from the model's forward to every block, so every block splits them.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "visual_transformer_blocks.0": {"visual_embed": ContextParallelInput(split_dim=1, expected_dims=3)},
        "visual_transformer_blocks.*": {
            "text_embed": ContextParallelInput(split_dim=1, expected_dims=3),
            "rope": ContextParallelInput(split_dim=1),
        },
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


class _CfgExchange:
    """Wraps the transformer's forward so that each CFG rank computes one branch per step.

    The pipeline calls the transformer with the cond inputs, then the uncond ones. On the first call the
    cond rank computes cond and the uncond rank computes uncond (from the negative embeddings it was
    given up front); both gather the two results; the second call returns the gathered uncond.
    """

    def __init__(self, transformer, group, branch: int):
        self.forward = transformer.forward
        self.group, self.branch = group, branch
        self.negative: dict | None = None
        self.calls = 0
        self.uncond = None
        transformer.forward = self

    def arm(self, negative: dict | None) -> None:
        """Set the uncond inputs for the next request, or None when it runs without guidance."""
        self.negative, self.calls, self.uncond = negative, 0, None

    def __call__(self, *args, **kwargs):
        if self.negative is None:
            return self.forward(*args, **kwargs)
        self.calls += 1
        if self.calls % 2 == 0:
            return self.uncond
        mine = self.forward(*args, **({**kwargs, **self.negative} if self.branch else kwargs))
        parts = [torch.empty_like(mine.sample) for _ in range(2)]
        dist.all_gather(parts, mine.sample.contiguous(), group=self.group)
        mine.sample = parts[0]
        self.uncond = type(mine)(sample=parts[1])
        return mine


class GangRenderer:
    """One rank of a gang. Every rank calls `render` with the same request; rank 0 returns the frames."""

    def __init__(self, model_path: str, spec: ParallelSpec, rank: int, *, device: str | None = None,
                 storage_options: dict | None = None):
        import diffusers
        from diffusers import Kandinsky5T2VPipeline
        from diffusers.models._modeling_parallel import ContextParallelConfig

        diffusers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        self.spec, self.rank = spec, rank
        self.device = device or default_device()
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.writer = rank == 0
        local = resolve_model(model_path, storage_options)
        # Only rank 0 encodes text and decodes video: the others skip the 7 B Qwen, CLIP and the VAE.
        skip = {} if self.writer else {"text_encoder": None, "text_encoder_2": None, "vae": None}
        self.pipe = Kandinsky5T2VPipeline.from_pretrained(local, dtype=self.dtype, use_safetensors=True, **skip)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

        mesh_type = "cuda" if self.device.startswith("cuda") else "cpu"
        mesh = dist.device_mesh.init_device_mesh(
            mesh_type, (2 if spec.cfg else 1, spec.ring, spec.ulysses), mesh_dim_names=("cfg", "ring", "ulysses"))
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
        self.cfg = _CfgExchange(transformer, mesh["cfg"].get_group(), mesh["cfg"].get_local_rank()) if spec.cfg else None
        self.load_seconds = time.perf_counter() - started

    def _encode(self, request: RenderRequest) -> dict:
        """Rank 0 encodes prompt and negative prompt once; every rank receives the same tensors."""
        payload = [None]
        if self.writer:
            kwargs = dict(max_sequence_length=512, device=self.device, dtype=self.pipe.transformer.dtype)
            qwen, clip, cu = self.pipe.encode_prompt(request.prompt, **kwargs)
            embeds = {"prompt_embeds_qwen": qwen, "prompt_embeds_clip": clip, "prompt_cu_seqlens": cu}
            negative = request.effective_negative_prompt()
            if negative is not None:
                qwen, clip, cu = self.pipe.encode_prompt(negative, **kwargs)
                embeds.update(negative_prompt_embeds_qwen=qwen, negative_prompt_embeds_clip=clip,
                              negative_prompt_cu_seqlens=cu)
            payload = [{k: v.cpu() for k, v in embeds.items()}]
        dist.broadcast_object_list(payload, src=0)
        return {k: v.to(self.device) for k, v in payload[0].items()}

    def render(self, request: RenderRequest) -> np.ndarray | None:
        """Run the pipeline on every rank; frames (per the seed contract) on rank 0, None elsewhere."""
        embeds = self._encode(request)
        if self.cfg is not None:
            negative = None
            if "negative_prompt_embeds_qwen" in embeds:
                cu = embeds["negative_prompt_cu_seqlens"]
                negative = {"encoder_hidden_states": embeds["negative_prompt_embeds_qwen"],
                            "pooled_projections": embeds["negative_prompt_embeds_clip"],
                            "text_rope_pos": torch.arange(cu.diff().max().item(), device=self.device)}
            self.cfg.arm(negative)
        out = self.pipe(
            **embeds, height=request.height, width=request.width, num_frames=request.num_frames,
            num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np" if self.writer else "latent",
        ).frames
        return to_uint8(np.asarray(out[0])) if self.writer else None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
