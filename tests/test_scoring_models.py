"""The model metrics (clip_score, aesthetic, subject_consistency) against their references, on the tiny presets.

clip_score against torchmetrics' CLIPScore itself; aesthetic and subject_consistency against VBench's formulas written
out here with VBench's own torchvision transforms. A scorer runs on the GPU when there is one (the references on the
CPU), so tolerances are looser there (cuDNN's TF32 convolutions).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.scoring.metric import FRAMES, PROMPT
from pipelines.scoring.registry import metric
from pipelines.scoring.video import Video
from pipelines.weights import directory_digest


ON_GPU = torch.cuda.is_available()
TOL = dict(rel=2e-3, abs=2e-3) if ON_GPU else dict(rel=1e-5, abs=1e-5)

PROMPTS = [
    "a cat dancing in the rain", "a dog running on the beach at sunset", "slow motion waves crashing on rocks",
    "a red car driving through a city street at night", "close-up of a flower opening in the morning light",
    "a timelapse of clouds over snowy mountains",
]
# Over 77 CLIP tokens (about 100): cut as torchmetrics cuts them.
LONG = [" ".join(2 * (PROMPTS[i:] + PROMPTS[:i])) for i in range(len(PROMPTS))]


def clips(frames: int = 17, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """Synthetic clips: noise, a drifting gradient, flat colours cycling."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([np.stack([(x * 4 + t * 9) % 256, (y * 5) % 256, (x + y + t * 3) % 256], -1)
                         for t in range(frames)]).astype(np.uint8)
    palette = rng.integers(0, 256, (5, 3), dtype=np.uint8)
    flat = np.broadcast_to(palette[np.arange(frames) % 5, None, None, :], (frames, height, width, 3)).copy()
    return [noise, gradient, flat]


@pytest.fixture(scope="module")
def clip_scorer(model_cache):
    return metric("clip_score").load()


@pytest.fixture(scope="module")
def oracle(model_cache):
    """torchmetrics' CLIPScore on the same directory, through its `model_name_or_path` callable: torchmetrics 1.9
    wants tensors from `get_*_features`, which transformers 5 returns inside output objects (torchmetrics#3407)."""
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from pipelines.scoring.weights import ensure_preset

    class Features(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_text_features(self, input_ids, attention_mask=None):
            return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

        def get_image_features(self, pixel_values):
            return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    path = ensure_preset("tiny-clip")
    reference = CLIPScore(model_name_or_path=lambda: (Features(CLIPModel.from_pretrained(path).eval()),
                                                       CLIPProcessor.from_pretrained(path)))

    def score(frames: np.ndarray, prompt: str) -> tuple[float, float]:
        """(CLIPScore, its unclamped mean) of 8 frames evenly spaced from first to last (all of a shorter clip)."""
        count = len(frames)
        picked = np.arange(count) if count < 8 else np.linspace(0, count - 1, 8).round().astype(int)
        images = list(torch.from_numpy(frames[picked]).permute(0, 3, 1, 2))
        reference.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its "longer than max_position_embeddings" notice
            reference.update(images, [prompt] * len(images))
        return float(reference.compute()), float(reference.score / reference.n_samples)

    return score


def test_clip_score_is_torchmetrics_clipscore_positive_clamped_and_cut(clip_scorer, oracle):
    """Over prompts (short, and over 77 tokens) and clips, the score is CLIPScore's; the cases include a positive
    mean, a negative one clamped to 0 (the clamp is of the mean) and a positive long prompt."""
    assert min(len(ids) for ids in clip_scorer.processor(text=LONG)["input_ids"]) > 77
    seen = {"positive": 0, "clamped": 0, "long positive": 0}
    for frames in clips():
        for prompt in PROMPTS + LONG:
            expected, mean = oracle(frames, prompt)
            got = clip_scorer(Video(frames=frames, fps=8, prompt=prompt))
            assert got == pytest.approx(expected, **TOL), (prompt, mean)
            if mean > 0:
                seen["positive"] += 1
                seen["long positive"] += prompt in LONG
            else:
                assert got == 0.0 and expected == 0.0
                seen["clamped"] += 1
    assert all(seen.values()), seen


def test_clip_score_of_a_video_without_prompt_is_null(clip_scorer):
    frames = clips()[0]
    assert clip_scorer(Video(frames=frames, fps=8)) is None
    assert clip_scorer(Video(frames=frames, fps=8, prompt="")) is None


def test_clip_score_of_a_short_clip_reads_every_frame_once(clip_scorer, oracle):
    for frames in clips(frames=3):
        for prompt in PROMPTS:
            expected, _ = oracle(frames, prompt)
            assert clip_scorer(Video(frames=frames, fps=8, prompt=prompt)) == pytest.approx(expected, **TOL)


def vbench_clip_transform(size: int):
    """vbench/utils.py's clip_transform, as written there."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Lambda, Normalize, Resize

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=False), CenterCrop(size),
                    Lambda(lambda x: x.float().div(255.0)),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def vbench_dino_transform(size: int):
    """vbench/utils.py's dino_transform, as written there."""
    from torchvision.transforms import Compose, Lambda, Normalize, Resize

    return Compose([Resize(size=size, antialias=False), Lambda(lambda x: x.float().div(255.0)),
                    Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def vbench_frames(frames: np.ndarray) -> torch.Tensor:
    """What VBench's load_video returns: torch.Tensor(frames) (float32 in [0, 255]), (T, C, H, W)."""
    return torch.Tensor(frames).permute(0, 3, 1, 2)


def aesthetic_reference(image_features, head_path: str, frames: np.ndarray, size: int) -> float:
    """VBench's laion_aesthetic for one video: CLIP image features, L2-normalised, LAION's head, / 10, mean."""
    state = torch.load(head_path, weights_only=True)
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    with torch.no_grad():
        feats = image_features(vbench_clip_transform(size)(vbench_frames(frames))).float()
        scores = head(F.normalize(feats, dim=-1, p=2)).squeeze(dim=-1)
    return float(torch.mean(scores / 10))


def test_aesthetic_is_vbenchs_aesthetic_quality(model_cache):
    """Every frame (40: two batches), through VBench's transform, CLIP's image embedding, the head, / 10, mean."""
    from transformers import CLIPVisionModelWithProjection

    from pipelines.scoring.aesthetic import HEAD_FILE

    from pipelines.scoring.weights import ensure_preset

    scorer = metric("aesthetic").load()
    path = str(ensure_preset("tiny-aesthetic"))
    model = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    for frames in clips(frames=40):
        expected = aesthetic_reference(lambda x: model(pixel_values=x).image_embeds, f"{path}/{HEAD_FILE}", frames,
                                       model.config.image_size)
        assert scorer(Video(frames=frames, fps=8)) == pytest.approx(expected, **TOL)
    head = scorer.provenance["head"]
    assert head["sha256"] == _sha256(f"{path}/{HEAD_FILE}") and head["source"] == "random (tiny-aesthetic)"


def test_aesthetic_reads_a_whole_clip_model_directory(model_cache, tmp_path):
    """The layout's other form: a CLIPModel directory (tiny-clip) plus the head, whose image side is read."""
    from transformers import CLIPModel

    from pipelines.scoring.aesthetic import HEAD_FILE, LAION_HEAD
    from pipelines.scoring.weights import ensure_preset

    directory = tmp_path / "clip-with-head"
    shutil.copytree(ensure_preset("tiny-clip"), directory)
    shutil.copy(ensure_preset("tiny-aesthetic") / HEAD_FILE, directory / HEAD_FILE)
    scorer = metric("aesthetic").load(str(directory))
    model = CLIPModel.from_pretrained(directory).eval()
    frames = clips()[1]
    expected = aesthetic_reference(lambda x: model.get_image_features(pixel_values=x).pooler_output,
                                   str(directory / HEAD_FILE), frames, model.config.vision_config.image_size)
    assert scorer(Video(frames=frames, fps=8)) == pytest.approx(expected, **TOL)
    assert scorer.provenance["head"]["source"] == LAION_HEAD  # not a preset: the layout asks for LAION's head
    assert scorer.provenance["weights"] == {"source": str(directory), "sha256": directory_digest(str(directory))}


def test_aesthetic_refuses_weights_without_the_head_or_of_another_width(model_cache, tmp_path):
    from pipelines.scoring.aesthetic import HEAD_FILE
    from pipelines.scoring.weights import ensure_preset

    bare = tmp_path / "bare"
    shutil.copytree(ensure_preset("tiny-dino"), bare)
    with pytest.raises(ValueError, match=f"weights='{bare}' of aesthetic: .*it has no {HEAD_FILE}"):
        metric("aesthetic").load(str(bare))
    wide = tmp_path / "wide"
    shutil.copytree(ensure_preset("tiny-aesthetic"), wide)
    torch.save(torch.nn.Linear(768, 1).state_dict(), wide / HEAD_FILE)
    with pytest.raises(ValueError, match=r"expected the state dict of a linear head 16 -> 1"):
        metric("aesthetic").load(str(wide))
    with pytest.raises(ValueError, match="a hub id, which holds no head"):
        metric("aesthetic").load("openai/clip-vit-large-patch14")


def subject_reference(model, frames: np.ndarray) -> float:
    """VBench's subject_consistency for one video, its per-frame loop as written there."""
    images = vbench_dino_transform(model.config.image_size)(vbench_frames(frames))
    video_sim = 0.0
    with torch.no_grad():
        for i in range(len(images)):
            out = model(pixel_values=images[i].unsqueeze(0), interpolate_pos_encoding=True)
            features = F.normalize(out.last_hidden_state[:, 0], dim=-1, p=2)
            if i == 0:
                first = features
            else:
                sim_pre = max(0.0, F.cosine_similarity(former, features).item())
                sim_fir = max(0.0, F.cosine_similarity(first, features).item())
                video_sim += (sim_pre + sim_fir) / 2
            former = features
    return video_sim / (len(images) - 1)


def test_subject_consistency_is_vbenchs(model_cache):
    """A still clip scores 1; changing ones score VBench's value, below 1; non-square frames keep their aspect."""
    from transformers import ViTModel

    from pipelines.scoring.weights import ensure_preset

    scorer = metric("subject_consistency").load()
    model = ViTModel.from_pretrained(ensure_preset("tiny-dino"), add_pooling_layer=False).eval()
    noise, gradient, flat = clips(frames=20)
    still = np.repeat(gradient[:1], 20, axis=0)
    assert scorer(Video(frames=still, fps=8)) == pytest.approx(1.0, abs=1e-5)
    for frames in (noise, gradient, flat, clips(frames=35, height=40, width=40)[0]):
        expected = subject_reference(model, frames)
        got = scorer(Video(frames=frames, fps=8))
        assert got == pytest.approx(expected, **TOL)
        assert got < 0.999


def test_subject_consistency_of_one_frame_is_null(model_cache):
    assert metric("subject_consistency").load()(Video(frames=clips(frames=1)[0], fps=8)) is None


def test_a_scorer_refuses_frames_that_are_not_rgb_bytes(clip_scorer):
    with pytest.raises(ValueError, match=r"frames of shape \(4, 8, 8\) and dtype uint8"):
        clip_scorer(Video(frames=np.zeros((4, 8, 8), np.uint8), fps=8, prompt="a cat"))


def test_entries_declare_gpu_tiny_weights_and_what_they_read():
    entries = {name: metric(name) for name in ("clip_score", "aesthetic", "subject_consistency")}
    assert {name: (e.device, e.weights, e.needs) for name, e in entries.items()} == {
        "clip_score": ("gpu", "tiny-clip", (FRAMES, PROMPT)),
        "aesthetic": ("gpu", "tiny-aesthetic", (FRAMES,)),
        "subject_consistency": ("gpu", "tiny-dino", (FRAMES,)),
    }


def test_a_metric_module_imports_before_the_registry():
    """A metric module takes `Metric` from pipelines.scoring.metric, so importing one before the registry works."""
    code = "import pipelines.scoring.aesthetic, pipelines.scoring.registry as r; print(sorted(r.METRICS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "aesthetic" in out.stdout


def test_presets_are_built_once_per_node_and_seeds_draw_other_weights(model_cache):
    from pipelines.scoring.weights import resolve_weights

    first = resolve_weights("tiny-dino", "subject_consistency")
    assert resolve_weights("tiny-dino", "subject_consistency").path == first.path
    other = resolve_weights("tiny-dino:1", "subject_consistency")
    assert other.path != first.path and directory_digest(other.path) != directory_digest(first.path)
    assert first.provenance() == {"source": "tiny-dino", "sha256": directory_digest(first.path)}


def test_weights_at_an_object_store_uri_are_copied_once(output_target, model_cache):
    """Weights as a URI (file:// and s3://): copied whole to the node cache once, then loaded from there."""
    import fsspec

    from pipelines.scoring.weights import ensure_preset, resolve_weights

    uri, options = output_target
    source = ensure_preset("tiny-dino")
    fs, root = fsspec.core.url_to_fs(uri, **(options or {}))
    fs.put(f"{source}/", f"{root}/", recursive=True)
    local = resolve_weights(uri, "subject_consistency", options)
    assert local.local and directory_digest(local.path) == directory_digest(str(source))
    assert resolve_weights(uri, "subject_consistency", options).path == local.path
    if options is None:  # file://: the scorer itself, from the copy
        scorer = metric("subject_consistency").load(uri)
        frames = clips()[1]
        assert scorer(Video(frames=frames, fps=8)) == metric("subject_consistency").load()(Video(frames=frames, fps=8))
        assert scorer.provenance["weights"]["source"] == uri


def test_weights_that_name_nothing_are_refused_by_name(model_cache, tmp_path):
    from pipelines.scoring.weights import resolve_weights

    with pytest.raises(ValueError, match=r"weights='\./nowhere' of clip_score: no such directory"):
        resolve_weights("./nowhere", "clip_score")
    with pytest.raises(ValueError, match=r"weights='tiny-clp' of clip_score: .*did you mean 'tiny-clip'\?"):
        resolve_weights("tiny-clp", "clip_score")
    with pytest.raises(ValueError, match=r"weights='tiny-clip:x' of clip_score: expected 'tiny-clip' or"):
        resolve_weights("tiny-clip:x", "clip_score")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"weights of clip_score 'file://.*' holds no config.json"):
        resolve_weights(f"file://{tmp_path / 'empty'}", "clip_score")
    hub = resolve_weights("openai/clip-vit-large-patch14", "clip_score")  # nothing downloaded until loaded
    assert (hub.path, hub.local) == ("openai/clip-vit-large-patch14", False)


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_the_tiny_clip_tokenizer_builds_the_same_every_time_and_knows_every_word_end():
    """The BPE trainer orders tied merges by hash map (another order per build); the build must not."""
    from pipelines.tiny import build_clip_tokenizer

    first, second = build_clip_tokenizer(), build_clip_tokenizer()
    assert first._tokenizer.to_str() == second._tokenizer.to_str()
    ids = first("A zebra, on a xylophone!")["input_ids"]
    assert first.convert_tokens_to_ids("<|endoftext|>") not in ids[1:-1]  # no piece unknown
