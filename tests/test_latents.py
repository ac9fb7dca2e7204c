"""`output.latents`: each row's final latents and prompt embeddings committed beside its video.

The oracle is plain diffusers: the saved latents equal `Kandinsky5T2VPipeline(..., output_type="latent")` for the
row's seed, the embeddings equal its `encode_prompt`, and the pipeline's own decode steps (`__call__` step 11:
permute to (B, C, T, H, W), divide by the VAE's scaling factor, `vae.decode`, `postprocess_video`) turn the saved
latents into exactly the committed npy frames. One latents job renders once (module fixture); tests that change
the output work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load as load_safetensors

from kandinsky_batch.config.load import load_config
from kandinsky_batch.config.schema import ConfigError
from kandinsky_batch.intake.preflight import check_latents
from kandinsky_batch.intake.resume import ResumeConflict
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import SCHEMA, read_manifest
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode_npy
from pipelines import resolve_model
from pipelines.kinds import BY_NAME
from pipelines.latents import read
from pipelines.tokens import k5_count_tokens
from tests.helpers import TINY_RENDER, write_dataset

pytestmark = pytest.mark.slow

ROWS = [
    {"id": "guided", "prompt": "a cat dancing", "guidance_scale": 5.0},
    {"id": "plain", "prompt": "a dog running", "guidance_scale": 1.0},
]
SCHEMA_IN = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("guidance_scale", pa.float64())])
EMBEDDINGS = ("prompt_embeds_qwen", "prompt_embeds_clip", "prompt_cu_seqlens")
NEGATIVE = tuple(f"negative_{name}" for name in EMBEDDINGS)


def _cfg(data: str, out: Path, *extra: str):
    return load_config(None, [f"input.path={data}", f"output.uri={out}", "output.format=npy", "cluster.replicas=1",
                              *TINY_RENDER, *extra])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, inprocess_module) -> tuple[str, Path]:
    """(dataset, output) of one finished 2-row tiny t2v job with `output.latents: true`."""
    root = tmp_path_factory.mktemp("latents")
    data = write_dataset(root / "prompts.parquet", ROWS, SCHEMA_IN)
    out = root / "out"
    result = run(_cfg(data, out, "output.latents=true"), progress=False)
    assert (result.ok, result.rendered) == (2, 2)
    return data, out


def _rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_manifest(Storage(str(out))).to_pylist()}


def _decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """Kandinsky5T2VPipeline.__call__'s step 11 on one row's (T, H, W, C) latents, to uint8 (F, H, W, 3)."""
    video = latents.to(pipe.vae.dtype).permute(3, 0, 1, 2)[None] / pipe.vae.config.scaling_factor
    video = pipe.vae.decode(video).sample
    video = pipe.video_processor.postprocess_video(video, output_type="pt")[0]
    return torch.round(video.float() * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_the_saved_latents_decode_to_exactly_the_committed_frames(rendered, tiny_pipe):
    _, out = rendered
    for rid, row in _rows(out).items():
        tensors = load_safetensors((out / row["latents_key"]).read_bytes())
        frames = decode_npy((out / row["key"]).read_bytes())
        with torch.no_grad():
            assert np.array_equal(_decode(tiny_pipe, tensors["latents"]), frames), rid


def test_the_latents_are_the_pipelines_own_latent_output_and_embeddings(rendered, tiny_pipe):
    """What `output_type="latent"` returns for the row's seed, and what `encode_prompt` gives for its texts."""
    _, out = rendered
    for rid, row in _rows(out).items():
        saved = read((out / row["latents_key"]).read_bytes())
        with torch.no_grad():
            want = tiny_pipe(prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=row["height"],
                             width=row["width"], num_frames=row["num_frames"],
                             num_inference_steps=row["num_inference_steps"], guidance_scale=row["guidance_scale"],
                             generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="latent").frames
            texts = {"": row["prompt"]} | ({"negative_": row["negative_prompt"]} if row["negative_prompt"] else {})
            encoded = {f"{side}{name}": t for side, text in texts.items()
                       for name, t in zip(EMBEDDINGS, tiny_pipe.encode_prompt(text, max_sequence_length=512))}
        vae = tiny_pipe.vae.config
        shape = ((row["num_frames"] - 1) // vae.temporal_compression_ratio + 1,
                 row["height"] // vae.spatial_compression_ratio, row["width"] // vae.spatial_compression_ratio,
                 tiny_pipe.transformer.config.in_visual_dim)
        assert saved.tensors["latents"].shape == shape, rid
        assert torch.equal(saved.tensors["latents"], want[0]), rid
        assert set(saved.tensors) == {"latents", *encoded}, rid
        for name, tensor in encoded.items():
            assert torch.equal(saved.tensors[name], tensor), (rid, name)
        # One Qwen vector per counted token (what docs/family.md's size arithmetic and benchmarks/latents_size.py use).
        for side, text in texts.items():
            assert saved.tensors[f"{side}prompt_embeds_qwen"].shape[1] == k5_count_tokens(
                os.path.join(resolve_model("tiny"), "tokenizer"), [text])[0], (rid, side)
        assert saved.metadata["scaling_factor"] == repr(vae.scaling_factor)
        assert (saved.metadata["dtype"], saved.metadata["seed"]) == ("float32", str(row["seed"]))
        assert saved.metadata["guided"] == str(row["negative_prompt"] is not None).lower()
    # Guidance decides whether the negative branch is there: the unguided row has no negative embeddings.
    assert _rows(out)["plain"]["negative_prompt"] is None


def test_the_manifest_names_each_latents_object_with_its_size_and_checksum(rendered):
    _, out = rendered
    for rid, row in _rows(out).items():
        data = (out / row["latents_key"]).read_bytes()
        assert row["latents_key"] == f"latents/{rid}.safetensors"
        assert (row["latents_bytes"], row["latents_sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert verify(str(out)) == []


def test_verify_catches_a_corrupted_a_missing_and_a_stray_latents_object(rendered, tmp_path):
    _, original = rendered
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    rows = _rows(out)
    corrupt = out / rows["guided"]["latents_key"]
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (out / rows["plain"]["latents_key"]).unlink()
    (out / "latents" / "ghost.safetensors").write_bytes(b"x")
    problems = verify(str(out))
    assert any(p.startswith("id='guided': latents latents/guided.safetensors has sha256") for p in problems), problems
    assert "id='plain': latents latents/plain.safetensors is missing" in problems
    assert "stray object latents/ghost.safetensors: no ok manifest row refers to it" in problems
    assert len(problems) == 3, problems


def test_a_rerun_of_the_latents_job_renders_nothing(rendered):
    data, out = rendered
    before = {p: p.read_bytes() for p in (out / "latents").iterdir()}
    result = run(_cfg(data, out, "output.latents=true"), progress=False)
    assert (result.ok, result.rendered, result.skipped) == (2, 0, 2)
    assert {p: p.read_bytes() for p in (out / "latents").iterdir()} == before


def test_default_jobs_write_no_latents_and_the_rule_is_part_of_a_committed_row(tmp_path, inprocess):
    """An output without latents resumed with `output.latents: true` is refused, naming the key; --force
    re-renders its rows with latents; forced back to false, the latents objects go with the columns."""
    data = write_dataset(tmp_path / "prompts.parquet", ROWS[1:], SCHEMA_IN)
    out = tmp_path / "out"
    assert run(_cfg(data, out), progress=False).rendered == 1
    table = read_manifest(Storage(str(out)))
    assert table.schema.equals(SCHEMA)
    assert table.select(["latents_key", "latents_sha256", "latents_bytes"]).to_pylist() == [
        {"latents_key": None, "latents_sha256": None, "latents_bytes": None}]
    assert not (out / "latents").exists()
    frames = (out / "videos" / "plain.npy").read_bytes()

    with pytest.raises(ResumeConflict, match=r"id='plain' \(output.latents: False -> True\)"):
        run(_cfg(data, out, "output.latents=true"), progress=False)
    assert not (out / "latents").exists()  # refused before anything was written

    assert run(_cfg(data, out, "output.latents=true"), force=True, progress=False).rendered == 1
    assert _rows(out)["plain"]["latents_key"] == "latents/plain.safetensors"
    assert (out / "videos" / "plain.npy").read_bytes() == frames  # the same frames, now with their latents
    assert verify(str(out)) == []

    with pytest.raises(ResumeConflict, match=r"output.latents: True -> False"):
        run(_cfg(data, out), progress=False)
    assert run(_cfg(data, out), force=True, progress=False).rendered == 1
    assert _rows(out)["plain"]["latents_key"] is None
    assert list((out / "latents").iterdir()) == []
    assert verify(str(out)) == []


@pytest.mark.parametrize("kind, preset", [("ti2va", "tiny-k6"), ("sr", "tiny-sr")])
def test_kinds_without_one_latent_refuse_output_latents(kind, preset):
    with pytest.raises(ConfigError, match=rf"^output.latents=True: {preset} is .* \({kind}\): "):
        check_latents(True, BY_NAME[kind], preset)
    check_latents(False, BY_NAME[kind], preset)
    for name in ("t2v", "i2v", "t2i", "i2i"):
        check_latents(True, BY_NAME[name], "a-k5-model")


def test_the_simulated_stand_in_refuses_output_latents():
    with pytest.raises(ConfigError, match=r"^output.latents=True: simulated is the simulated stand-in"):
        check_latents(True, BY_NAME["t2v"], "simulated")


def test_output_latents_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match=r"output.latents"):
        load_config(None, [f"input.path={tmp_path}", f"output.uri={tmp_path}", "output.latents=sometimes"])


def _renderer(preset: str):
    from pipelines.render import Renderer

    renderer = Renderer(preset)
    renderer.apply_options()
    renderer.keep_latents = True
    return renderer


def _request(prompt: str, seed: int, image: bytes | None = None, **sizes):
    from pipelines.request import RenderRequest

    return RenderRequest(prompt=prompt, negative_prompt=None, **{"height": 32, "width": 32, "num_frames": 5, **sizes},
                         num_inference_steps=2, guidance_scale=5.0, seed=seed, image=image)


def test_image_to_video_saves_its_latents_after_the_first_frame_renormalisation(model_cache):
    """I2V's `normalize_first_frame` runs after the loop, before decoding: the saved latents are those it gives
    (without it they would not decode to the frames)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 48, 3), (200, 30, 30), np.uint8)).save(buf, "PNG")
    renderer = _renderer("tiny-i2v")
    clip = renderer.render(_request("a red ball", 3, num_frames=17, image=buf.getvalue()))
    latents = clip.latents.tensors["latents"]
    assert latents.shape == ((17 - 1) // 4 + 1, 32 // 8, 32 // 8, renderer.pipe.transformer.config.in_visual_dim)
    with torch.no_grad():
        assert np.array_equal(_decode(renderer.pipe, latents), clip.frames)


def test_text_to_image_saves_one_latent_frame(model_cache):
    renderer = _renderer("tiny-t2i")
    clip = renderer.render(_request("a cat", 5, height=640, width=1408, num_frames=1))
    pipe = renderer.pipe
    latents = clip.latents.tensors["latents"]
    assert latents.shape == (1, 640 // 8, 1408 // 8, pipe.transformer.config.in_visual_dim)
    with torch.no_grad():  # Kandinsky5T2IPipeline.__call__'s step 10, on one row
        image = pipe.vae.decode(latents[0].permute(2, 0, 1)[None] / pipe.vae.config.scaling_factor).sample
        image = pipe.image_processor.postprocess(image, output_type="pt")
    assert np.array_equal(torch.round(image * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), clip.frames)
    assert clip.latents.metadata["num_frames"] == "1"


def test_a_batched_render_saves_each_rows_own_latents_and_embeddings(model_cache):
    """Rows batched in one call: each saves its slice of the batch's latents, and its own embeddings."""
    renderer = _renderer("tiny")
    requests = [_request("a cat dancing", 1), _request("a dog running", 2)]
    clips = renderer.render_batch(requests)
    pipe = renderer.pipe
    with torch.no_grad():
        encoded = [dict(zip(EMBEDDINGS, pipe.encode_prompt(r.prompt, max_sequence_length=512))) for r in requests]
        negative = dict(zip(NEGATIVE, pipe.encode_prompt(renderer.kind.default_negative_prompt,
                                                         max_sequence_length=512)))
        # The pipeline's batch of packed sequences: embeddings stacked, cu_seqlens the running sum of the lengths.
        lengths = [e["prompt_embeds_qwen"].shape[1] for e in encoded]
        negative_length = negative["negative_prompt_embeds_qwen"].shape[1]
        batch = {"prompt_embeds_qwen": torch.cat([e["prompt_embeds_qwen"] for e in encoded]),
                 "prompt_embeds_clip": torch.cat([e["prompt_embeds_clip"] for e in encoded]),
                 "prompt_cu_seqlens": torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
                 **{k: torch.cat([v, v]) for k, v in negative.items() if not k.endswith("cu_seqlens")},
                 "negative_prompt_cu_seqlens": torch.tensor([0, negative_length, 2 * negative_length],
                                                            dtype=torch.int32)}
        want = pipe(**batch, height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0,
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
                    output_type="latent").frames
    for i, clip in enumerate(clips):
        assert torch.equal(clip.latents.tensors["latents"], want[i]), i
        for name, tensor in {**encoded[i], **negative}.items():
            assert torch.equal(clip.latents.tensors[name], tensor), (i, name)


def test_a_webdataset_export_carries_each_rows_latents_as_its_own_member(rendered, tmp_path):
    import webdataset as wds

    from kandinsky_batch.cli import main

    _, out = rendered
    dest = tmp_path / "wds"
    assert main(["export", str(out), "--format", "webdataset", "--to", str(dest), "--address", "inprocess"]) == 0
    rows = _rows(out)
    seen = set()
    for sample in wds.WebDataset(sorted(str(p) for p in dest.glob("*.tar")), shardshuffle=False):
        row = rows[json.loads(sample["json"])["id"]]
        assert hashlib.sha256(sample["latents.safetensors"]).hexdigest() == row["latents_sha256"]
        assert hashlib.sha256(sample["npy"]).hexdigest() == row["sha256"]
        seen.add(row["id"])
    assert seen == set(rows)
