"""NABLA sparse attention, and the attention processors of a sequence-parallel Kandinsky 5 transformer.

NABLA (the attention the 10 s checkpoints ship with) keeps, per head, the key blocks that carry most of
the attention mass of 64-token pooled queries and keys, plus a local space-time window (STA), and runs
flex attention over that block mask. It approximates full attention: rows rendered with it are marked
approximate in the manifest.

Sequence parallel needs its own attention processor here. diffusers' Ulysses attention receives the
mask already built, and the stock processor builds it from a sequence *shard* of q and k, which is a
different (wrong) mask; flex attention, the only backend that takes a block mask, has no
context-parallel path either. `UlyssesAttnProcessor` does the Ulysses all-to-all itself with diffusers'
own helpers, so each rank holds the whole sequence for its share of the heads, builds the mask there
(NABLA's mask is per head, so this is exactly the single-device mask for those heads), runs the local
attention op and sends the result back.
"""

from __future__ import annotations

import torch

# The 10 s Lite checkpoints' values, used when NABLA is switched on for a model that ships without it.
NABLA_DEFAULTS = {"P": 0.9, "wT": 11, "wH": 3, "wW": 3, "add_sta": True, "method": "topcdf"}


def set_attention_type(transformer, attention_type: str | None, nabla_args: dict | None = None) -> str:
    """Switch the transformer to `regular` or `nabla` attention (None: as shipped); returns the type in effect.

    The pipeline reads `transformer.config.attention_type` and `attention_*` each call to build its
    sparse parameters, so changing the config is all it takes.
    """
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    config = transformer.config
    kind = attention_type or config.attention_type
    if kind == "nabla":
        shipped = {k: config.get(f"attention_{k}") for k in NABLA_DEFAULTS}
        args = {**NABLA_DEFAULTS, **{k: v for k, v in shipped.items() if v is not None}, **(nabla_args or {})}
        transformer.register_to_config(attention_type="nabla", **{f"attention_{k}": v for k, v in args.items()})
    else:
        transformer.register_to_config(attention_type=kind)
    transformer.attention_type = kind
    for block in transformer.visual_transformer_blocks:
        block.self_attention.set_processor(NablaAttnProcessor() if kind == "nabla" else Kandinsky5AttnProcessor())
    return kind


# NABLA's mask is made of 64-token blocks; flex's fused kernel tiles must divide them. diffusers 0.42.1 pins
# only BLOCK_M and leaves BLOCK_N to torch, whose default on Hopper (torch 2.11) is 128: the compiled kernel
# then refuses the mask ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"), seen on an H200.
NABLA_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}


def nabla_attention(query, key, value, sparse_params: dict):
    """NABLA attention of (B, S, H, D) tensors: the pipeline's block mask (`nablaT_v2`), then flex attention.

    On CUDA the fused flex kernel is compiled here when the caller is not already being compiled: eager
    flex materialises every score (236 GiB for one 5 s 768x512 Lite layer, seen on an H200). On the CPU
    eager flex is what diffusers runs too, so frames stay bit-identical to it.
    """
    from diffusers.models.transformers.transformer_kandinsky import nablaT_v2
    from torch.nn.attention.flex_attention import flex_attention

    mask = nablaT_v2(query, key, sparse_params["sta_mask"], thr=sparse_params["P"])
    query, key, value = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    if query.is_cuda:
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        out = attend(query, key, value, block_mask=mask, kernel_options=NABLA_KERNEL_OPTIONS)
    else:
        out = flex_attention(query, key, value, block_mask=mask)
    return out.permute(0, 2, 1, 3)


_COMPILED_FLEX = []


def _compiled_flex():
    """flex_attention compiled once per process (torch's own advice for running it outside a compiled model)."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


class NablaAttnProcessor:
    """Single-device Kandinsky 5 self-attention with NABLA: the stock processor's projections, `nabla_attention`.

    Installed on the visual self-attention blocks by `set_attention_type`; without sparse params (a call
    with regular attention) it attends through diffusers' dispatcher exactly as the stock processor does.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = _projected(attn, hidden_states, encoder_hidden_states, rotary_emb)
        if sparse_params is None:
            out = dispatch_attention_fn(query, key, value, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        else:
            out = nabla_attention(query, key, value, sparse_params)
        return attn.out_layer(out.flatten(-2, -1))


def _projected(attn, hidden_states, encoder_hidden_states, rotary_emb):
    """q, k, v as `Kandinsky5AttnProcessor.__call__` (diffusers 0.42.1) computes them before attention.

    Kept step for step (fp32 norms, bf16 rotary), so a gang's frames stay bit-identical to one device.
    """
    query = attn.to_query(hidden_states)
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    key, value = attn.to_key(source), attn.to_value(source)
    query = query.reshape(*query.shape[:-1], attn.num_heads, -1)
    key = key.reshape(*key.shape[:-1], attn.num_heads, -1)
    value = value.reshape(*value.shape[:-1], attn.num_heads, -1)
    query = attn.query_norm(query.float()).type_as(query)
    key = attn.key_norm(key.float()).type_as(key)

    def apply_rotary(x, rope):
        x_ = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
        return (rope * x_).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16)

    if rotary_emb is not None:
        query = apply_rotary(query, rotary_emb).type_as(query)
        key = apply_rotary(key, rotary_emb).type_as(key)
    return query, key, value


class UlyssesAttnProcessor:
    """Kandinsky 5 attention for a visual sequence shard: Ulysses all-to-all, attend locally, all-to-all back.

    Self-attention: q, k, v go to (whole sequence, this rank's heads); NABLA's mask is built there.
    Cross-attention: the text runs whole on every rank, so only q is exchanged and k, v are this rank's
    head slice of the whole-text projection - no key/value traffic, and the projection runs on the
    same rows as on one device (a GEMM over a 3-row text shard rounds differently from one over all).
    `_parallel_config` stays None on purpose, so diffusers neither routes this through its own
    context-parallel attention nor refuses the flex backend.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        import torch.distributed as dist
        from diffusers.models.attention_dispatch import (
            all_to_all_single_any_o_async,
            all_to_all_single_any_qkv_async,
            dispatch_attention_fn,
            ulysses_anything_metadata,
        )

        query, key, value = _projected(attn, hidden_states, encoder_hidden_states, rotary_emb)
        # (B, S_local, H, D) -> (B, S, H_local, D); the "any" helpers allow shards of unequal length.
        metadata = ulysses_anything_metadata(query)
        if encoder_hidden_states is None:
            waits = [all_to_all_single_any_qkv_async(x, self.group, **metadata) for x in (query, key, value)]
            query, key, value = (wait() for wait in waits)
        else:
            query = all_to_all_single_any_qkv_async(query, self.group, **metadata)()
            heads, rank = query.shape[2], dist.get_rank(self.group)  # rank r receives head chunk r
            key, value = (x[:, :, rank * heads:(rank + 1) * heads] for x in (key, value))
        if sparse_params is not None:
            out = nabla_attention(query, key, value, sparse_params)
        else:
            out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        out = all_to_all_single_any_o_async(out, self.group, **metadata)()
        return attn.out_layer(out.flatten(-2, -1))


def use_ulysses_processors(transformer, group, nabla: bool) -> None:
    """Processors for a sequence-parallel transformer, after `enable_parallelism` marked them all for CP.

    - text blocks run whole on every rank: plain local attention (diffusers' Ulysses over an unsplit
      sequence would attend to every key once per rank: the same softmax, rounded differently, and
      wasted work);
    - visual cross-attention: `UlyssesAttnProcessor` (whole text, so no key/value exchange);
    - visual self-attention: diffusers' own context-parallel attention (Ulysses, ring, unified), or
      `UlyssesAttnProcessor` for NABLA, whose mask must be built on the whole sequence.
    """
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5AttnProcessor

    for block in transformer.text_transformer_blocks:
        block.self_attention.set_processor(Kandinsky5AttnProcessor())
    for block in transformer.visual_transformer_blocks:
        block.cross_attention.set_processor(UlyssesAttnProcessor(group))
        if nabla:
            block.self_attention.set_processor(UlyssesAttnProcessor(group))
