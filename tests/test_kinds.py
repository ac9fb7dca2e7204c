"""The whole family through `job.run`: text-to-image, image-to-video and Kandinsky 6 (video with sound),
each against plain diffusers for its kind (the seed contract), with images checked row by row, resume and verify.

Every kind runs its job on one in-process replica (`inprocess`: the same worker and queue, images read by URI
inside the worker; one replica, a model load each, as which replica renders a row is not checked here). Kandinsky 6
also runs on Ray in tests/test_gangs.py, and an upscale in tests/test_sr.py.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from kandinsky_batch.config.schema import ConfigError

from kandinsky_batch.config.load import load_config
from kandinsky_batch.job import run
from kandinsky_batch.output.manifest import read_manifest
from kandinsky_batch.intake.resume import ResumeConflict
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.verify import verify
from kandinsky_batch.output.video import decode, decode_av, decode_npz
from pipelines import resolve_model, to_uint8
from tests.helpers import write_dataset

pytestmark = pytest.mark.slow
SIZE = ["render.height=32", "render.width=32", "render.num_inference_steps=2", "render.fps=8", "cluster.replicas=1"]


def _png(color, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pipe(name: str, preset: str):
    import diffusers

    pipe = getattr(diffusers, name).from_pretrained(resolve_model(preset))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cfg(tmp_path, rows, *extra, schema=None):
    data = write_dataset(tmp_path / "in.parquet", rows, schema)
    return load_config(None, [f"input.path={data}", f"output.uri={tmp_path / 'out'}", *SIZE, *extra])


def _objects(cfg) -> tuple[Storage, dict]:
    storage = Storage(cfg.output.uri)
    return storage, {r["id"]: r for r in read_manifest(storage).to_pylist()}


def test_text_to_image_renders_images_as_plain_diffusers(tmp_path, inprocess):
    rows = [{"id": "cat", "prompt": "a cat"}, {"id": "dog", "prompt": "a dog", "guidance_scale": 1.0},
            {"id": "film", "prompt": "a film", "num_frames": 5}, {"id": "odd", "prompt": "a cat", "height": 512}]
    cfg = _cfg(tmp_path, rows, "model.path=tiny-t2i", "output.format=png", "render.height=640", "render.width=1408")
    result = run(cfg, progress=False)
    assert (result.ok, result.invalid) == (2, 2)
    storage, manifest = _objects(cfg)
    assert manifest["film"]["error"].startswith("num_frames=5: this model renders one image")
    # The pipeline would silently render another size: refused, naming the sizes it takes.
    assert manifest["odd"]["error"].startswith("width x height=1408x512: not a size this t2i model renders")
    plain = _pipe("Kandinsky5T2IPipeline", "tiny-t2i")
    for rid in ("cat", "dog"):
        row = manifest[rid]
        assert row["num_frames"] == 1 and row["key"] == f"images/{rid}.png"  # stills under images/
        image = decode(storage.get_bytes(storage.key_of(row["uri"])), "png")
        want = plain(prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=640, width=1408,
                     num_inference_steps=2, guidance_scale=row["guidance_scale"],
                     generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np").image
        np.testing.assert_array_equal(image, to_uint8(want[:1]), err_msg=rid)  # PNG is lossless
    assert verify(cfg.output.uri) == []
    assert run(cfg, progress=False).rendered == 0
    with pytest.raises(ConfigError, match="output.format='mp4': tiny-t2i is a t2i model and renders images"):
        run(load_config(None, [f"input.path={tmp_path / 'in.parquet'}", f"output.uri={tmp_path / 'o2'}",
                               "model.path=tiny-t2i", "output.format=mp4"]), progress=False)


def test_image_to_video_reads_images_row_by_row(tmp_path, inprocess):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "red.png").write_bytes(_png((200, 30, 30)))
    (tmp_path / "imgs" / "note.txt").write_bytes(b"not an image")
    (tmp_path / "imgs" / "tiny.png").write_bytes(_png((0, 0, 0), size=(8, 8)))
    rows = [
        {"id": "uri", "prompt": "a red ball", "image": "imgs/red.png", "image_bytes": None},
        {"id": "abs", "prompt": "a red ball", "image": f"file://{tmp_path / 'imgs' / 'red.png'}"},
        {"id": "missing", "prompt": "a ball", "image": None},
        {"id": "gone", "prompt": "a ball", "image": "imgs/gone.png"},
        {"id": "text", "prompt": "a ball", "image": "imgs/note.txt"},
        {"id": "small", "prompt": "a ball", "image": "imgs/tiny.png"},
    ]
    rows = [{k: v for k, v in r.items() if k != "image_bytes"} for r in rows]
    cfg = _cfg(tmp_path, rows, "model.path=tiny-i2v", "output.format=npy", "render.num_frames=17")
    result = run(cfg, progress=False)
    assert (result.ok, result.invalid) == (2, 4)
    storage, manifest = _objects(cfg)
    errors = {k: r["error"] for k, r in manifest.items() if r["status"] == "invalid"}
    assert errors["missing"].startswith("image=None: missing (rule: the i2v model renders from a conditioning image")
    assert errors["gone"].startswith("image='imgs/gone.png': cannot read")
    assert errors["text"].startswith("image='imgs/note.txt': not an image")
    assert errors["small"].startswith("image='imgs/tiny.png': 8x8 pixels (rule: each side from 16")
    plain = _pipe("Kandinsky5I2VPipeline", "tiny-i2v")
    import hashlib

    for rid in ("uri", "abs"):
        row = manifest[rid]
        assert row["image_sha256"] == hashlib.sha256(_png((200, 30, 30))).hexdigest()
        assert row["image_uri"] == f"{tmp_path / 'imgs' / 'red.png'}" or row["image_uri"].endswith("imgs/red.png")
        frames = decode(storage.get_bytes(storage.key_of(row["uri"])), "npy")
        want = plain(image=Image.open(io.BytesIO(_png((200, 30, 30)))).convert("RGB"), prompt=row["prompt"],
                     negative_prompt=row["negative_prompt"], height=32, width=32, num_frames=17,
                     num_inference_steps=2, guidance_scale=row["guidance_scale"],
                     generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np").frames[0]
        np.testing.assert_array_equal(frames, to_uint8(want), err_msg=rid)
    assert verify(cfg.output.uri) == []
    # A changed image is a changed parameter: refused like any other, unless forced.
    (tmp_path / "imgs" / "red.png").write_bytes(_png((30, 200, 30)))
    with pytest.raises(ResumeConflict, match="image_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        run(cfg, progress=False)
    assert run(cfg, force=True, progress=False).rendered == 2


def test_images_as_bytes_in_the_dataset_and_a_video_model_refusing_them(tmp_path, inprocess):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.binary())])
    rows = [{"id": "blue", "prompt": "a blue sky", "image": _png((20, 40, 220))},
            {"id": "junk", "prompt": "a sky", "image": b"\x89PNG broken"}]
    cfg = _cfg(tmp_path, rows, "model.path=tiny-i2v", "output.format=npy", "render.num_frames=17", schema=schema)
    result = run(cfg, progress=False)
    assert (result.ok, result.invalid) == (1, 1)
    _, manifest = _objects(cfg)
    assert manifest["blue"]["image_uri"] is None and manifest["blue"]["image_sha256"]
    assert manifest["junk"]["error"].startswith("image=<11 bytes>: not an image")
    # The same dataset on a text-to-video model: rows with an image are invalid, saying so.
    other = load_config(None, [f"input.path={tmp_path / 'in.parquet'}", f"output.uri={tmp_path / 'o2'}", *SIZE,
                               "model.path=tiny", "render.num_frames=5"])
    result = run(other, progress=False)
    assert result.invalid == 2
    _, manifest = _objects(other)
    assert manifest["blue"]["error"].startswith("image=<")
    assert "the t2v model takes no image" in manifest["blue"]["error"]


def test_kandinsky6_renders_video_with_sound_as_plain_diffusers(tmp_path, inprocess):
    rows = [{"id": "talk", "prompt": "a man talking"}, {"id": "still", "prompt": "a bell", "image": None},
            {"id": "quiet", "prompt": "waves", "guidance_scale": 1.0}]
    (tmp_path / "bell.png").write_bytes(_png((240, 200, 40)))
    rows[1]["image"] = "bell.png"
    cfg = _cfg(tmp_path, rows, "model.path=tiny-k6", "output.format=npy", "render.num_frames=5", "render.fps=24")
    result = run(cfg, progress=False)
    storage, manifest = _objects(cfg)
    assert (result.ok, result.invalid) == (3, 0), {rid: row["error"] for rid, row in manifest.items()}
    plain = _pipe("Kandinsky6TI2VAPipeline", "tiny-k6")
    for rid, row in manifest.items():
        assert row["uri"].endswith(f"/videos/{rid}.npz") and row["audio_sample_rate"] == 44100
        assert row["expanded_prompt"] is None and row["options"] is None
        frames, audio, rate = decode_npz(storage.get_bytes(storage.key_of(row["uri"])))
        image = Image.open(io.BytesIO(_png((240, 200, 40)))).convert("RGB") if row["image_sha256"] else None
        want = plain(prompt=row["prompt"], image=image, negative_prompt=row["negative_prompt"], height=32, width=32,
                     num_frames=5, frame_rate=24.0, num_inference_steps=2, guidance_scale=row["guidance_scale"],
                     generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np")
        np.testing.assert_array_equal(frames, to_uint8(want.frames[0]), err_msg=rid)
        np.testing.assert_array_equal(audio, want.audio[:1], err_msg=rid)  # the waveform, bit for bit
        assert rate == 44100 and row["audio_seconds"] == audio.shape[1] / 44100 >= 5 / 24
    assert verify(cfg.output.uri) == []
    assert run(cfg, progress=False).rendered == 0

    # mp4: H.264 video with AAC sound, decoding to the manifest's frame count, size and audio length; the prompts
    # expanded first (tests/test_k6.py checks those renders against plain diffusers), each rewrite recorded.
    # One row is enough for what the container and the options add (the rows above cover the kinds of row).
    one = write_dataset(tmp_path / "one.parquet", [{"id": "talk", "prompt": "a man talking"}])
    mp4 = load_config(None, [f"input.path={one}", f"output.uri={tmp_path / 'mp4'}", *SIZE,
                             "model.path=tiny-k6", "render.num_frames=5", "render.fps=24", "model.expand_prompts=true"])
    assert run(mp4, progress=False).ok == 1
    storage, manifest = _objects(mp4)
    for rid, row in manifest.items():
        assert row["options"] == '{"expand_prompts": true}' and row["expanded_prompt"] not in (None, row["prompt"])
        frames, audio, rate = decode_av(storage.get_bytes(storage.key_of(row["uri"])))
        assert frames.shape == (row["num_frames"], row["height"], row["width"], 3) and rate == row["audio_sample_rate"]
        # AAC decodes whole 1024-sample frames: the sound is as long as recorded, to within one of them.
        assert abs(audio.shape[1] / rate - row["audio_seconds"]) <= 1024 / rate, rid
    assert verify(mp4.output.uri) == []
    # Video alone (the pipeline's video-only mode: other frames, no sound), raw frames in an .npy.
    silent = load_config(None, [f"input.path={one}", f"output.uri={tmp_path / 'silent'}", *SIZE,
                                "model.path=tiny-k6", "render.num_frames=5", "render.fps=24", "output.format=npy",
                                "model.sample_audio=false"])
    assert run(silent, progress=False).ok == 1
    storage, manifest = _objects(silent)
    row = manifest["talk"]
    assert row["uri"].endswith("/videos/talk.npy") and row["audio_sample_rate"] is None
    assert row["options"] == '{"sample_audio": false}'
    want = plain(prompt=row["prompt"], negative_prompt=row["negative_prompt"], height=32, width=32, num_frames=5,
                 frame_rate=24.0, num_inference_steps=2, guidance_scale=row["guidance_scale"], sample_audio=False,
                 generator=torch.Generator("cpu").manual_seed(row["seed"]), output_type="np")
    np.testing.assert_array_equal(decode(storage.get_bytes(storage.key_of(row["uri"])), "npy"),
                                  to_uint8(want.frames[0]))
    assert verify(silent.output.uri) == []
    with pytest.raises(ConfigError, match="render.fps=8: tiny-k6 renders its sound for 24 fps video"):
        run(load_config(None, [f"input.path={tmp_path / 'in.parquet'}", f"output.uri={tmp_path / 'o3'}", *SIZE,
                               "model.path=tiny-k6"]), progress=False)


def test_family_rules_are_checked_before_ray(tmp_path):
    """Rules of a kind that need no render: a distilled Kandinsky 6 takes guidance 1.0 only (and no CFG gang)."""
    from dataclasses import replace

    from kandinsky_batch.intake.preflight import preflight
    from kandinsky_batch.intake.ids import IdIndex
    from kandinsky_batch.intake.rows import RowValidator
    from pipelines import load_spec

    rows = [{"id": "a", "prompt": "a bell", "guidance_scale": 1.0}, {"id": "b", "prompt": "a bell"}]
    cfg = _cfg(tmp_path, rows, "model.path=tiny-k6", "render.fps=24", "render.num_frames=5")
    distilled = replace(load_spec("tiny-k6"), guidance=1.0)
    table = pa.Table.from_pylist(rows)
    validated = RowValidator(cfg, distilled, IdIndex.build(table["id"], 2, "mp4")).validate(table, np.arange(2))
    assert [t.id for t in validated.task_list()] == ["a"]
    assert validated.invalid[0]["error"].startswith("guidance_scale=5.0: this distilled checkpoint runs at "
                                                    "guidance_scale=1.0 only")
    # A CFG-parallel gang has no uncond branch to split off for a distilled checkpoint (guidance 1.0 only).
    from kandinsky_batch.intake.routing import check_shapes
    from pipelines.request import RenderOptions

    gang = _cfg(tmp_path, rows, "model.path=tiny-k6", "render.fps=24", "cluster.cfg_parallel=true")
    with pytest.raises(ConfigError, match="cluster.cfg_parallel: a distilled Kandinsky 6 checkpoint runs without"):
        check_shapes(gang.cluster, distilled, RenderOptions())
    check_shapes(gang.cluster, load_spec("tiny-k6"), RenderOptions())  # with guidance it runs (tests/test_gangs.py)
    with pytest.raises(ConfigError, match="model.sample_audio=False: only Kandinsky 6 renders sound"):
        preflight(_cfg(tmp_path, rows, "model.path=tiny", "model.sample_audio=false"))
    with pytest.raises(ConfigError, match=r"model.expand_prompts=True: only Kandinsky 6 expands prompts \(t2v does"):
        preflight(_cfg(tmp_path, rows, "model.path=tiny", "model.expand_prompts=true"))
    with pytest.raises(ConfigError, match="model.expand_prompts=True: with offload_text_encoder=True"):
        preflight(_cfg(tmp_path, rows, "model.path=tiny-k6", "render.fps=24", "model.expand_prompts=true",
                       "model.offload_text_encoder=true"))
    with pytest.raises(ConfigError, match="model.attention_type='nabla': does not apply to t2i"):
        preflight(_cfg(tmp_path, rows, "model.path=tiny-t2i", "model.attention_type=nabla", "output.format=png",
                       "render.height=1024", "render.width=1024"))


def test_image_to_image_counts_its_texts_with_the_image_and_renders_as_plain_diffusers(tmp_path, inprocess):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.binary())])
    rows = [{"id": "sky", "prompt": "a blue sky", "image": _png((20, 40, 220), size=(96, 64))},
            {"id": "pad", "prompt": "a <|image_pad|> sky", "image": _png((20, 40, 220))},
            {"id": "none", "prompt": "a sky", "image": None}]
    cfg = _cfg(tmp_path, rows, "model.path=tiny-i2i", "output.format=png", "render.height=640", "render.width=1408",
               schema=schema)
    result = run(cfg, progress=False)
    assert (result.ok, result.invalid) == (1, 2)
    storage, manifest = _objects(cfg)
    assert manifest["pad"]["error"].startswith("prompt='a <|image_pad|> sky': contains <|image_pad|>")
    assert manifest["none"]["error"].startswith("image=None: missing (rule: the i2i model")
    row = manifest["sky"]
    plain = _pipe("Kandinsky5I2IPipeline", "tiny-i2i")
    want = plain(image=Image.open(io.BytesIO(rows[0]["image"])).convert("RGB"), prompt=row["prompt"],
                 negative_prompt=row["negative_prompt"], height=640, width=1408, num_inference_steps=2,
                 guidance_scale=row["guidance_scale"], generator=torch.Generator("cpu").manual_seed(row["seed"]),
                 output_type="np").image
    np.testing.assert_array_equal(decode(storage.get_bytes(storage.key_of(row["uri"])), "png"), to_uint8(want[:1]))
    assert verify(cfg.output.uri) == []
