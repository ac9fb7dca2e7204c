"""The `vbench` export format: the folder VBench's standard protocol evaluates, `{prompt}-{index}.mp4` and nothing else.

VBench (`vbench/__init__.py::build_full_info_json`, mode `vbench_standard`) looks up, for every entry of its
`VBench_full_info.json`, the files `f"{prompt_en}-{i}{postfix}"` for i in 0..4 in `--videos_path`, where `postfix` is
the suffix of `os.listdir(videos_path)[0]`: any other entry there (a manifest, `_SUCCESS`, a temp file, a folder)
can come first and make every video "missing". So the mp4s go to a folder of their own, `VIDEOS_DIR` under DEST.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from kandinsky_batch.errors import InputError, ResumeConflict
from kandinsky_batch.export.objects import publish_once, read_video
from kandinsky_batch.export.sample import IndexRow, Sample, Unit
from kandinsky_batch.output.storage import Storage

NAME = "vbench"
SHARDED = False

VIDEOS_DIR = "videos"
"""DEST's folder of the mp4s: `evaluate.py --videos_path DEST/videos`; the core's bookkeeping stays beside it."""
SEEDS = 5
"""Videos per prompt VBench reads (`for i in range(5)`); its temporal_flickering protocol samples 25 and
`static_filter.py` keeps 5 static ones, so more seeds are accepted when they run 0..n-1."""
MAX_NAME_BYTES = 255
"""The longest file name ext4, XFS, APFS and NTFS take (in UTF-8 bytes on Linux)."""


def _prompt_and_index(sample: Sample) -> tuple[str, int]:
    """The exact prompt text and seed index a sample is named by, refused if it has none."""
    prompt, index = sample.meta.get("prompt"), sample.meta.get("sweep_seed_index")
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f"id {sample.id!r}: meta prompt={prompt!r}: VBench names a video by its prompt text")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InputError(f"prompt {prompt!r} (id {sample.id!r}): sweep_seed_index={index!r}: VBench names each of "
                         f"a prompt's {SEEDS} videos by its seed index; render with a sweep of `seeds: {SEEDS}`")
    return prompt, index


def video_name(sample: Sample) -> str:
    """`{prompt}-{index}.mp4` with the prompt exactly as VBench's suite spells it; refused if no file can hold it."""
    prompt, index = _prompt_and_index(sample)
    name = f"{prompt}-{index}.mp4"
    if "/" in prompt or "\0" in prompt:
        raise InputError(f"prompt {prompt!r} (id {sample.id!r}) holds '/' or NUL, which no file name can: "
                         "VBench looks the video up by the exact prompt text and has no rule to escape them")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise InputError(f"prompt {prompt[:60]!r}... (id {sample.id!r}): its file name is {size} "
                         f"bytes long, over the {MAX_NAME_BYTES} a file system takes; VBench has no rule to shorten it")
    return name


def check(samples: list[Sample]) -> None:
    """Refuse, before anything is written, a selection VBench would misread: one line naming the prompt."""
    by_prompt: dict[str, dict[int, str]] = defaultdict(dict)
    for sample in samples:
        name = video_name(sample)
        prompt, index = _prompt_and_index(sample)
        if "mp4" not in sample.media:
            raise InputError(f"prompt {prompt!r} (id {sample.id!r}): media={sorted(sample.media)}: VBench reads mp4 "
                             "videos only (render with output.format=mp4)")
        earlier = by_prompt[prompt].setdefault(index, sample.id)
        if earlier != sample.id:
            raise InputError(f"prompt {prompt!r}: ids {earlier!r} and {sample.id!r} both make {name!r}; a VBench "
                             "folder holds one model's videos (select one with --where \"sweep_model = '...'\")")
    for prompt, indices in by_prompt.items():
        count = max(len(indices), SEEDS)
        missing = sorted(set(range(count)) - set(indices))
        if missing:
            raise InputError(f"prompt {prompt!r}: seed indices {missing} are missing (have {sorted(indices)}); "
                             f"VBench evaluates {SEEDS} videos per prompt, indices 0..{SEEDS - 1}")


def write_unit(unit: Unit, source: Storage, dest: Storage) -> list[IndexRow]:
    """Copy each sample's mp4, checked against its sha256, to `VIDEOS_DIR/{prompt}-{index}.mp4` create-only."""
    rows = []
    for sample in unit.samples:
        path = f"{VIDEOS_DIR}/{video_name(sample)}"
        publish_once(dest, path, read_video(source, sample, "mp4"))
        rows.append(IndexRow(key=sample.key, id=sample.id, split=sample.split, unit=unit.name, path=path, offset=0,
                             sha256=sample.sha256, bytes=sample.bytes))
    return rows


def finish(dest: Storage, index: pa.Table, samples: list[Sample]) -> None:
    """Leave the folder holding the index's mp4s only: temp files of killed writes removed, anything else refused."""
    dest.cleanup_temp(VIDEOS_DIR)
    wanted = set(index.column("path").to_pylist())
    strays = sorted(key for key in dest.iter_keys(VIDEOS_DIR) if key not in wanted)  # a page at a time
    if strays:
        raise ResumeConflict(f"{dest.url(VIDEOS_DIR)} holds {len(strays)} object(s) this export did not write "
                             f"(first {strays[0]!r}); VBench reads every entry there: export to an empty DEST")
