"""`kandinsky-batch reproduce OUTPUT_URI ID`: re-render one committed row in this process and compare.

The seed contract (docs/guarantees.md) says a row's frames equal plain diffusers' for its seed, in a stated
environment. This checks it for one row: its manifest row gives the effective parameters, model, options,
seed and image or source clip; the row is rendered again here through the renderer the replicas use
(`pipelines.open_renderer`, plain diffusers underneath) under the replicas' CPU numerics, and compared
with the committed object: npy frames value by value; an mp4, being lossy, by the re-render's own
encoding (the same `encode`; libx264 is deterministic for the same frames and settings), bytes and frames.
Runs in the driver's place (no Ray); `prepare_process` must run before torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from kandinsky_batch.errors import ReproduceError
from pipelines.numerics import SWITCH, cpu_numerics_env


def prepare_process(argv: list[str]) -> None:
    """Re-exec this program with the replicas' CPU numerics variables set if it did not start with them.

    They are read when torch loads (`pipelines.numerics`), so setting them later would be too late."""
    missing = {k: v for k, v in cpu_numerics_env().items() if os.environ.get(k) != v}
    if not missing:
        return
    if "torch" in sys.modules:
        raise RuntimeError("reproduce: torch was imported before the CPU numerics variables were set")
    env = {**os.environ, **missing}
    os.execve(sys.executable, [sys.executable, "-m", "kandinsky_batch", *argv], env)


@dataclass(frozen=True)
class Comparison:
    """How a re-render compares with the committed object."""

    id: str
    format: str
    values: int
    """Values compared (frames of the object against the re-render's; for mp4 both decoded)."""
    differing: int
    max_levels: int
    object_sha256: str
    manifest_sha256: str | None
    rerender_sha256: str
    environment: str
    weights: str | None = None
    """The fingerprint of the weights loaded here, when it differs from the row's `weights` (else None)."""

    @property
    def frames_equal(self) -> bool:
        return self.differing == 0

    @property
    def encoding_equal(self) -> bool:
        return self.object_sha256 == self.rerender_sha256

    @property
    def equal(self) -> bool:
        return self.frames_equal and self.encoding_equal


def environment() -> str:
    """The numerics this process renders with, in one line (what the seed contract states)."""
    import torch

    if torch.cuda.is_available():
        return (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                "bf16")
    pinned = cpu_numerics_env()
    path = (" ".join(f"{k}={os.environ.get(k)}" for k in pinned) if pinned
            else f"{SWITCH}=native (the host's own kernels)")
    return f"CPU, {path}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def _row(storage, row_id: str) -> dict:
    import pyarrow.compute as pc

    from kandinsky_batch.output.manifest import read_manifest

    rows = read_manifest(storage).filter(pc.field("id") == row_id).to_pylist()
    if not rows:
        raise ReproduceError(f"id={row_id!r}: not in the manifest of {storage.root}")
    row = rows[-1]
    if row["status"] != "ok":
        raise ReproduceError(f"id={row_id!r}: its row is {row['status']} ({row['error']}), nothing to reproduce")
    return row


def _options(recorded: str | None):
    from pipelines.request import RenderOptions

    values = json.loads(recorded) if recorded else {}
    for name in ("cache_args", "nabla_args"):
        if name in values:
            values[name] = tuple(sorted(values[name].items()))
    return RenderOptions(**values)


def _request(row: dict, storage_options: dict | None):
    """The render request of a manifest row: the fields `Task.request()` gives a replica."""
    from kandinsky_batch.intake.images import read as read_image
    from kandinsky_batch.intake.job_output import read_source
    from pipelines import RenderRequest

    image = video = None
    if row.get("image_sha256") is not None:
        if row.get("image_uri") is None:
            raise ReproduceError(f"id={row['id']!r}: its image was given as bytes in the dataset, which the "
                                 "manifest does not keep")
        image = read_image(row["image_uri"], storage_options)
        if hashlib.sha256(image).hexdigest() != row["image_sha256"]:
            raise ReproduceError(f"id={row['id']!r}: image {row['image_uri']} changed since the job read it")
    if row.get("source_uri") is not None:
        video = read_source(row["source_uri"], row["source_sha256"], storage_options)
    return RenderRequest(prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=row["height"],
                         width=row["width"], num_frames=row["num_frames"],
                         num_inference_steps=row["num_inference_steps"], guidance_scale=row["guidance_scale"],
                         seed=row["seed"], image=image, video=video)


def _model_path(row: dict) -> str:
    """The row's model, pinned to the hub commit that rendered it when the manifest names one."""
    from pipelines.resolve import pinned

    weights = row.get("weights") or ""
    if row.get("model_revision") is None and weights.startswith("hub:"):
        return pinned(row["model"], weights.rsplit("@", 1)[1])
    return pinned(row["model"], row.get("model_revision"))


def reproduce(uri: str, row_id: str, storage_options: dict | None = None,
              input_storage_options: dict | None = None) -> Comparison:
    """Re-render row `row_id` of the output at `uri` in this process and compare it with its committed object."""
    import torch

    from kandinsky_batch.intake.job_output import encode_upscaled
    from kandinsky_batch.output.verify import open_target
    from kandinsky_batch.output.video import decode, encode
    from pipelines import open_renderer, weights_fingerprint

    storage = open_target(uri, storage_options, "reproduce", ReproduceError)
    row = _row(storage, row_id)
    data = storage.get_bytes(row["key"])
    request = _request(row, input_storage_options)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as a CPU replica: small matmuls round differently with more threads
    model = _model_path(row)
    renderer = open_renderer(model, options=_options(row["options"]))
    loaded = weights_fingerprint(model) if row.get("weights") else None
    rendered = renderer.render(request)
    fmt, ext = row["format"], row["key"].rsplit(".", 1)[-1]
    encoded = (encode(rendered, fmt, row["fps"]) if request.video is None
               else encode_upscaled(rendered, request.video, fmt, row["fps"]))
    got = decode(data, ext)
    # npy is lossless: the re-render's frames themselves; mp4 is lossy: its encoding, decoded the same way.
    want = np.asarray(getattr(rendered, "frames", rendered)) if fmt == "npy" else decode(encoded, ext)
    if got.shape != want.shape:
        raise ReproduceError(f"id={row_id!r}: the object holds frames {got.shape}, the re-render {want.shape}")
    levels = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return Comparison(id=row_id, format=fmt, values=int(levels.size), differing=int(np.count_nonzero(levels)),
                      max_levels=int(levels.max(initial=0)), object_sha256=hashlib.sha256(data).hexdigest(),
                      manifest_sha256=row["sha256"], rerender_sha256=hashlib.sha256(encoded).hexdigest(),
                      environment=environment(), weights=None if loaded == row.get("weights") else loaded)


def format_comparison(c: Comparison) -> str:
    """What `reproduce` prints: the environment, then frames and encoding, each `equal` or how far apart."""
    what = ("frames" if c.format == "npy" else
            f"frames (decoded; {c.format} is lossy, so the re-render is encoded the same way and decoded)")
    if c.frames_equal:
        frames = f"{what}: equal ({c.values} values)"
    else:
        frames = (f"{what}: {c.differing} of {c.values} values ({c.differing / c.values:.4%}) differ, "
                  f"by at most {c.max_levels} uint8 level(s)")
    encoding = ("encoding: equal (sha256 " + c.object_sha256[:16] + "…)" if c.encoding_equal else
                f"encoding: differs (object sha256 {c.object_sha256[:16]}…, re-render {c.rerender_sha256[:16]}…)")
    if c.manifest_sha256 not in (None, c.object_sha256):
        encoding += "; the object is not what the job committed (its sha256 differs from the manifest's)"
    if c.weights is not None:
        encoding += f"; the weights loaded here ({c.weights}) are not the ones that rendered the row"
    return "\n".join([f"reproduce {c.id!r}: re-rendered in-process with plain diffusers on {c.environment}",
                      frames, encoding, "equal" if c.equal else "not equal"])
