"""Where a model comes from (`model.path`) and what it can render (its limits).

`model.path` is one of: a tiny preset of each kind (`tiny`, `tiny-i2v`, `tiny-t2i`, `tiny-i2i`, `tiny-k6`, `tiny-sr`; `tiny:SEED` is
another draw of its transformer), a local diffusers directory, an fsspec URI of one
(s3://, gs://, az://, file://; copied to a local cache once per node), or a hub id.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import html
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.kinds import kind_of
from pipelines.tiny import TEMPLATE_TOKENS, ensure_tiny

TINY = "tiny"
# `simulated[:...]`: a stand-in that sleeps for each row's modelled GPU cost; for orchestration benchmarks only.
SIMULATED = "simulated"
# What the system needs to validate rows without loading weights.
SPEC_FILES = ["model_index.json", "*/config.json", "*/*_config.json", "tokenizer/*"]
# The tiny offline presets of each kind: `model.path` -> the builder of its pipeline ("module:function(seed)").
PRESETS = {
    "tiny": "pipelines.tiny:build_tiny_pipeline",
    "tiny-i2v": "pipelines.tiny_k5:build_tiny_i2v_pipeline",
    "tiny-t2i": "pipelines.tiny_k5:build_tiny_t2i_pipeline",
    "tiny-i2i": "pipelines.tiny_k5:build_tiny_i2i_pipeline",
    "tiny-k6": "pipelines.tiny_k6:build_tiny_k6_pipeline",
    "tiny-sr": "pipelines.tiny_sr:build_tiny_sr_pipeline",
}
# The pipeline's default `max_sequence_length`: prompt tokens kept after the template.
MAX_PROMPT_TOKENS = 512


class ModelNotFound(ValueError):
    """`model.path` names no model that can be loaded here; the message says what the value was taken as."""


def _taken_as(path: str) -> str:
    """What `model.path` is read as: a preset, an object-store URI, a local directory or a hub id."""
    if path.partition(":")[0] in PRESETS:
        return "a preset"
    if _is_uri(path):
        return "an object-store URI"
    if path.startswith(("./", "../", "/", "~")) or os.path.isdir(path):
        return "a local directory"
    return "a hub id"


def _not_found(path: str, problem: str) -> ModelNotFound:
    """The one-line refusal of `model.path`, with a near preset name when there is one (`tinyy` -> `tiny`)."""
    near = difflib.get_close_matches(path.partition(":")[0], PRESETS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near and _taken_as(path) != "a preset" else ""
    if _taken_as(path) == "a hub id" and "/" in path:  # `models/mine` may have meant a folder: say there is none
        hint += f"; there is no local directory {path!r} either"
    return ModelNotFound(f"model.path={path!r} (taken as {_taken_as(path)}): {problem}{hint}")


def _redacted(exc: BaseException, storage_options: dict | None) -> str:
    """An exception's first line with the storage options' string values (credentials) blanked out."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    stack = [storage_options or {}]
    while stack:
        for value in stack.pop().values():
            if isinstance(value, dict):
                stack.append(value)
            elif isinstance(value, str) and len(value) >= 4:
                line = line.replace(value, "<redacted>")
    return line


def _hub_snapshot(path: str, revision: str | None = None, patterns: list[str] | None = SPEC_FILES) -> str:
    """A hub id's files (by default its configs and tokenizer) at `revision` from the Hugging Face cache (downloaded
    unless offline), or why not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return snapshot_download(path, revision=revision, allow_patterns=patterns)
    except RevisionNotFoundError:
        raise _not_found(path, f"the hub repository has no revision {revision!r} (model.revision)") from None
    except HFValidationError:
        raise _not_found(path, "not a preset, a local directory, an object-store URI or a valid hub id "
                               "(org/name)") from None
    except RepositoryNotFoundError:
        raise _not_found(path, "no such repository on the Hugging Face hub (or it is gated or private: "
                               "log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise _not_found(path, f"not in the local Hugging Face cache and {why}, so it cannot be downloaded "
                               "(download it where there is network, or point model.path at a local copy)") from None


def cache_root() -> Path:
    """Per-node cache for the tiny build and copied checkpoints (`KANDINSKY_BATCH_CACHE` overrides)."""
    return Path(os.environ.get("KANDINSKY_BATCH_CACHE", Path.home() / ".cache" / "kandinsky-batch"))


def _is_uri(path: str) -> bool:
    return "://" in path


def _copy_once(uri: str, storage_options: dict | None, patterns: list[str] | None) -> Path:
    """Copy a diffusers directory from object storage to the node cache (atomic rename, once)."""
    import fsspec

    tag = "spec" if patterns else "full"
    target = cache_root() / "models" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{tag}"
    if (target / "model_index.json").exists():
        return target
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=target.parent))
    try:
        for pattern in patterns or ["**"]:
            for src in fs.glob(f"{root.rstrip('/')}/{pattern}"):
                if fs.isdir(src):
                    continue
                dst = tmp / os.path.relpath(src, root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(src, str(dst))
        if not (tmp / "model_index.json").exists():
            raise FileNotFoundError(f"model.path {uri!r} holds no model_index.json (not a diffusers directory)")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def preset(path: str) -> tuple[str, int] | None:
    """(preset, weight seed) of a tiny preset path (`tiny`, `tiny-i2v:1`, ...); None for other paths."""
    name, sep, value = path.partition(":")
    if name not in PRESETS:
        return None
    if sep and (not value.isdigit() or int(value) > 2**31):
        raise ModelNotFound(f"model.path={path!r} (taken as a preset): expected {name!r} or '{name}:SEED' with SEED an integer in [0, 2^31]")
    return name, int(value) if sep else 0


def split_revision(path: str) -> tuple[str, str | None]:
    """(hub id, revision) of a hub id pinned as `ORG/NAME@REVISION` (`pinned`); (path, None) for any other path."""
    if _is_uri(path) or os.path.isdir(path) or "@" not in path:
        return path, None
    name, _, revision = path.rpartition("@")
    return name, revision or None


def pinned(path: str, revision: str | None) -> str:
    """The model path that pins a hub id to `model.revision` (the form `resolve_model` and `split_revision` read)."""
    return path if revision is None else f"{path}@{revision}"


def resolve_model(path: str, storage_options: dict | None = None, spec_only: bool = False) -> str:
    """Turn `model.path` into something `from_pretrained` loads: a local directory or a hub id.

    With `spec_only`, fetch only configs and the tokenizer (what validation needs), never weights; a path that names
    no model raises ModelNotFound.
    """
    if (found := preset(path)) is not None:
        return str(ensure_tiny(cache_root(), found[1], found[0], PRESETS[found[0]]))
    if _is_uri(path):
        if not spec_only:
            return str(_copy_once(path, storage_options, None))
        try:
            return str(_copy_once(path, storage_options, SPEC_FILES))
        except FileNotFoundError as exc:
            raise _not_found(path, "holds no model_index.json (not a diffusers directory)"
                             if "model_index.json" in str(exc) else _redacted(exc, storage_options)) from None
        except Exception as exc:  # noqa: BLE001 - credentials, network, a missing backend: said in one line
            raise _not_found(path, f"cannot be read ({_redacted(exc, storage_options)})") from None
    if os.path.isdir(os.path.expanduser(path)):
        local = os.path.expanduser(path)
        if spec_only and not os.path.isfile(os.path.join(local, "model_index.json")):
            raise _not_found(path, "holds no model_index.json (not a diffusers directory)")
        return local
    if _taken_as(path) == "a local directory":
        raise _not_found(path, "no such directory")
    repo, revision = split_revision(path)
    if spec_only or revision is not None:  # a pinned snapshot loads from its own folder, weights and all
        return _hub_snapshot(repo, revision, SPEC_FILES if spec_only else None)
    return path


@dataclass(frozen=True)
class ModelSpec:
    """The limits of one checkpoint, read from its configs: what a row may ask of it."""

    path: str
    attention_type: str
    num_heads: int
    spatial_multiple: int
    temporal_multiple: int
    max_frames: int
    max_size: int
    max_prompt_tokens: int
    kind: str = "t2v"
    """The family member (`pipelines.kinds`): t2v, i2v, t2i, i2i, ti2va, sr."""
    audio_sample_rate: int | None = None
    """Samples per second of the kind's sound (Kandinsky 6), None without sound."""
    min_frames: int = 1
    """Fewest frames a row may ask for (image-to-video renormalises its first latent frames against later ones)."""
    sizes: tuple = ()
    """(width, height) pairs the kind renders, when it takes only some (text-to-image); empty: any multiple."""
    guidance: float | None = None
    """The only guidance scale the checkpoint takes (a distilled Kandinsky 6: 1.0), or None."""
    tile_sizes: tuple = ()
    """(height, width) tiles the model was trained on (super-resolution): they decide its output size."""
    tokenizer_dir: str | None = field(default=None, repr=False, compare=False)
    """The checkpoint's `tokenizer/` folder (Qwen2.5-VL's processor files), copied locally."""

    def with_attention(self, kind: str) -> "ModelSpec":
        """The limits when the model runs `regular` or `nabla` attention (NABLA groups 8x8 patches: 128 px)."""
        if kind == self.attention_type:
            return self
        patch = self.spatial_multiple // 8 if self.attention_type == "nabla" else self.spatial_multiple
        return replace(self, attention_type=kind, spatial_multiple=patch * 8 if kind == "nabla" else patch)

    def negative_prompt(self, negative: str | None, guidance_scale: float) -> str | None:
        """The negative prompt this kind's pipeline really uses: none without guidance, its own default if unset."""
        if self.kind == "sr":  # no text at all
            return None
        if self.kind == "ti2va":
            from pipelines.render_k6 import k6_negative_prompt

            return k6_negative_prompt(negative, guidance_scale)
        from pipelines.limits import default_negative_prompt

        return default_negative_prompt(self.kind, negative, guidance_scale)

    def processor(self):
        """The pipeline's own text processor (transformers' AutoProcessor over `tokenizer/`)."""
        return _processor(self.tokenizer_dir)

    def prompt_tokens(self, prompt: str) -> int:
        """Qwen tokens the prompt takes of the pipeline's `max_sequence_length` window, after it cleans the prompt
        and wraps it in its template: the prompt's own plus the template's closing `<|im_end|>`.

        diffusers 0.42.1 tokenizes at most 128 (template head) + max_sequence_length tokens and warns that it
        truncated exactly when this count exceeds max_sequence_length (tests/test_pipelines.py checks the boundary
        with the real Qwen tokenizer). This is the pipeline's way, one prompt at a time; `count_tokens` is the
        driver's.
        """
        from diffusers.pipelines.kandinsky5.pipeline_kandinsky import prompt_clean

        text = [_prompt_template().format(prompt_clean(prompt))]
        return len(self.processor()(text=text, return_tensors=None)["input_ids"][0]) - TEMPLATE_TOKENS

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """`prompt_tokens` of many prompts in one call of the Rust tokenizer, without torch in the process.

        The template's head ends in a newline and its tail is the special `<|im_end|>`, and a cleaned prompt
        starts and ends with non-space: Qwen's pre-tokenizer splits at both seams, so the prompt's own tokens
        plus one are the count. tests/test_tokenizer.py checks it against `prompt_tokens` on tricky prompts and
        at the limit. Loading transformers or diffusers here would import torch (~700 MB in the driver).
        """
        if self.kind == "ti2va":  # Kandinsky 6's template and rules (no prompt cleaning)
            from pipelines.render_k6 import k6_count_tokens

            return k6_count_tokens(self.tokenizer_dir, prompts)
        if self.kind == "sr":  # takes no text: a prompt carried from the source row costs nothing
            return [0] * len(prompts)
        if self.kind == "i2i":  # the image shares the prompt's window: a text alone has no count
            raise ValueError("kind='i2i': a text's token count depends on its row's image; count with "
                             "pipelines.limits.k5_i2i_count_tokens(tokenizer_dir, prompts, image_sizes)")
        encoded = _fast_tokenizer(self.tokenizer_dir).encode_batch([clean_prompt(p) for p in prompts],
                                                                   add_special_tokens=False)
        return [len(e.ids) + 1 for e in encoded]


def clean_prompt(text: str) -> str:
    """diffusers' Kandinsky 5 `prompt_clean` (ftfy if installed, HTML unescaped twice, whitespace folded), here
    so that the driver need not import diffusers, and with it torch, for four lines. tests/test_tokenizer.py
    checks that both agree."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def _ftfy():
    """ftfy if installed (diffusers uses it only then), looked up once: a failed import is slow."""
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


@functools.lru_cache(maxsize=4)
def _fast_tokenizer(folder: str):
    """The tokenizer's Rust core from its `tokenizer.json` (the file transformers' fast tokenizer loads)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


@functools.lru_cache(maxsize=4)
def _processor(folder: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


@functools.lru_cache(maxsize=1)
def _prompt_template() -> str:
    """The pipeline's Qwen prompt template (built once: it lives on a pipeline instance)."""
    from diffusers import Kandinsky5T2VPipeline

    return Kandinsky5T2VPipeline(None, None, None, None, None, None, None).prompt_template


def load_spec(path: str, storage_options: dict | None = None) -> ModelSpec:
    """Read a model's limits from its configs and tokenizer, without loading any weights."""
    if path.startswith(SIMULATED):
        from pipelines.simulated import simulated_spec

        try:
            return simulated_spec(path)
        except ValueError as exc:  # a malformed `simulated:...`: refused like any model path
            raise ModelNotFound(str(exc)) from None
    local = Path(resolve_model(path, storage_options, spec_only=True))
    kind = kind_of(local)
    if kind.name == "sr":
        from pipelines.render_sr import sr_spec_fields

        return ModelSpec(path=path, kind=kind.name, **sr_spec_fields(local))
    if kind.name == "ti2va":
        from pipelines.render_k6 import k6_row_rules, k6_spec_fields

        rules = k6_row_rules(local)
        return ModelSpec(path=path, kind=kind.name, tokenizer_dir=str(local / "tokenizer"),
                         min_frames=rules["min_frames"], guidance=rules["guidance_scale"], **k6_spec_fields(local))
    if kind.name != "t2v":
        from pipelines.limits import k5_row_rules, k5_spec_fields

        rules = k5_row_rules(kind.name)
        return ModelSpec(path=path, kind=kind.name, tokenizer_dir=str(local / "tokenizer"),
                         min_frames=rules["min_frames"], sizes=tuple(rules["sizes"] or ()),
                         **k5_spec_fields(local, kind.name))
    transformer = json.loads((local / "transformer" / "config.json").read_text())
    vae = json.loads((local / "vae" / "config.json").read_text())
    head_dim = sum(transformer["axes_dims"])
    spatial = vae.get("spatial_compression_ratio", 8) * transformer["patch_size"][1]
    temporal = vae.get("temporal_compression_ratio", 4)
    nabla = transformer.get("attention_type") == "nabla"
    # RoPE tables hold 128 positions per axis (Kandinsky5RoPE3D): latent frames and patched rows/cols.
    return ModelSpec(
        path=path,
        attention_type=transformer.get("attention_type", "regular"),
        num_heads=transformer["model_dim"] // head_dim,
        spatial_multiple=128 if nabla else spatial,
        temporal_multiple=temporal,
        max_frames=temporal * 127 + 1,
        max_size=spatial * 128,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        tokenizer_dir=str(local / "tokenizer"),
    )
