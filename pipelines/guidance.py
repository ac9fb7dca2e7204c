"""The two transformer calls of a guided step, intercepted from outside the pipeline.

`Kandinsky5T2VPipeline.__call__` (and Kandinsky 6's) calls the transformer with the cond inputs, then with the
uncond ones, every step. Wrapping the transformer's forward lets us, without touching the pipeline:
- keep step caches (MagCache, FirstBlockCache, TaylorSeer) apart for the two branches (`cache_context`), which the
  pipeline itself does not do;
- batch both branches into one forward when their text lengths match (same math, one launch);
- run the branches on two ranks at once (CFG parallel) and exchange the results.
The second call of a step then returns what the first one already computed.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


class GuidedSteps:
    """Replaces `transformer.forward`; `arm()` it before each pipeline call."""

    def __init__(self, transformer, *, batched: bool = False, exchange_group=None, branch: int = 0,
                 cache_contexts: bool = False):
        self.transformer, self.forward = transformer, transformer.forward
        self.batched, self.group, self.branch = batched, exchange_group, branch
        self.cache_contexts = cache_contexts
        self.negative: dict | None = None
        self.calls, self.uncond = 0, None
        self.batched_steps = 0
        transformer.forward = self

    def arm(self, negative: dict | None) -> None:
        """The uncond inputs of the next request (encoder states, pooled, text rope), or None without guidance."""
        self.negative, self.calls, self.uncond, self.batched_steps = negative, 0, None, 0

    def _context(self, name: str):
        return self.transformer.cache_context(name) if self.cache_contexts else nullcontext()

    def __call__(self, *args, **kwargs):
        if self.negative is None:
            with self._context("cond"):
                return self.forward(*args, **kwargs)
        self.calls += 1
        if self.calls % 2 == 0:
            return self.uncond
        uncond_kwargs = {**kwargs, **self.negative}
        if self.group is not None:
            return self._exchange(kwargs, uncond_kwargs)
        same_text = kwargs["encoder_hidden_states"].shape == uncond_kwargs["encoder_hidden_states"].shape
        if self.batched and same_text:
            return self._batched(kwargs, uncond_kwargs)
        with self._context("cond"):
            cond = self.forward(**kwargs)
        with self._context("uncond"):
            self.uncond = self.forward(**uncond_kwargs)
        return cond

    def _batched(self, cond: dict, uncond: dict):
        """Cond and uncond as a batch of two in one forward (text lengths equal, so no padding enters)."""
        self.batched_steps += 1
        joined = dict(cond)
        for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            joined[key] = torch.cat([cond[key], uncond[key]])
        with self._context("cond+uncond"):  # a step cache then tracks the pair as one stream
            out = self.forward(**joined)
        first, second = out.sample.chunk(2)
        self.uncond = type(out)(sample=second)
        out.sample = first
        return out

    def _exchange(self, cond: dict, uncond: dict):
        """CFG parallel: this rank computes its branch, then both ranks gather both results.

        Kandinsky 5's transformer returns an output with `.sample`; Kandinsky 6's (`return_dict=False`) a tuple of
        the video and the audio prediction: each tensor is gathered.
        """
        with self._context("uncond" if self.branch else "cond"):
            mine = self.forward(**(uncond if self.branch else cond))
        if isinstance(mine, tuple):
            pairs = [self._gather(t) for t in mine]
            self.uncond = tuple(None if p is None else p[1] for p in pairs)
            return tuple(None if p is None else p[0] for p in pairs)
        first, second = self._gather(mine.sample)
        mine.sample = first
        self.uncond = type(mine)(sample=second)
        return mine

    def _gather(self, tensor):
        """(cond, uncond) of one output tensor from the two branch ranks (None stays None)."""
        import torch.distributed as dist

        if tensor is None:
            return None
        parts = [torch.empty_like(tensor) for _ in range(2)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return parts[0], parts[1]


def negative_inputs(embeds: dict, device) -> dict | None:
    """The transformer kwargs of the uncond branch, from the pipeline's negative prompt embeddings."""
    if "negative_prompt_embeds_qwen" not in embeds:
        return None
    cu = embeds["negative_prompt_cu_seqlens"]
    return {"encoder_hidden_states": embeds["negative_prompt_embeds_qwen"],
            "pooled_projections": embeds["negative_prompt_embeds_clip"],
            "text_rope_pos": torch.arange(cu.diff().max().item(), device=device)}
