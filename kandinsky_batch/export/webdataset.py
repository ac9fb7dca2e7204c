"""The `webdataset` export format: each unit one tar shard that WebDataset, HF `datasets` and tar itself read.

A sample is the consecutive members `{key}.{ext}`: the video as rendered (`mp4`), `json` (its metadata with `key`
and `caption`), `txt` (the caption), `jpg` (the poster), then any other media the sample carries, in that order.
Shards are built whole in memory with fixed header fields, so the same unit always gives the same bytes, and
published create-only.
"""

from __future__ import annotations

import io
import json
import re
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from kandinsky_batch.errors import InputError
from kandinsky_batch.export.objects import publish_once, read_video, replace
from kandinsky_batch.export.sample import IndexRow, Sample, Unit
from kandinsky_batch.export.samples import Samples
from kandinsky_batch.output.storage import Storage

NAME = "webdataset"
SHARDED = True

VIDEO_EXTENSIONS = ("mp4", "npy", "npz", "png", "webp", "jpeg")
"""What a render is stored as (`output.format`); the one of these a sample carries is the video its sha256 names."""
GENERATED = ("json", "txt")
POSTER = "jpg"
MTIME = 0
"""Every member's mtime: a shard's bytes depend on its samples only, not on when it was written."""
_EXTENSION = re.compile(r"[a-z0-9]+(?:\.[a-z0-9]+)*")
_UNIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Extensions HF's webdataset builder decodes into other values (its DECODERS): members it would not read as bytes.
_HF_DECODED = {"text", "transcript", "cls", "cls2", "index", "inx", "id", "jsn", "ten", "tb", "mp", "msg", "npy",
               "npz", "cbor", "pth"}
_HF_MEDIA = {"mp4": "video", "jpg": "image", "jpeg": "image", "png": "image", "webp": "image"}
_HF_SCALARS = {"boolean": "bool", "integer": "int64", "float": "float64", "string": "string"}
CARD = "README.md"
_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"), (list, "list"), (dict, "object"))


def _json_type(value) -> str | None:
    """The JSON type a loader infers for a value (bool before int: a bool is an int in Python); None for null."""
    if value is None:
        return None
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def member_extensions(sample: Sample) -> list[str]:
    """The extensions of a sample's members in the order they are written: video, json, txt, poster, the rest."""
    video = video_extension(sample)
    rest = sorted(ext for ext in sample.media if ext not in (video, POSTER))
    return [video, *GENERATED, *([POSTER] if POSTER in sample.media else []), *rest]


def video_extension(sample: Sample) -> str:
    """The extension of the sample's video: the one media entry in `VIDEO_EXTENSIONS`."""
    found = [ext for ext in VIDEO_EXTENSIONS if ext in sample.media]
    if len(found) != 1:
        raise InputError(f"id {sample.id!r}: media={sorted(sample.media)} must hold exactly one video, "
                         f"one of {list(VIDEO_EXTENSIONS)}")
    return found[0]


def _metadata(sample: Sample) -> bytes:
    """The sample's `.json`: its metadata with `key` and `caption`, sorted keys, UTF-8, no NaN (JSON has none)."""
    meta = {**sample.meta, "key": sample.key, "caption": sample.caption}
    try:
        text = json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"id {sample.id!r}: meta cannot be written as JSON: {exc}") from exc
    return text.encode("utf-8")


def _repeated_keys(samples) -> set[str] | None:
    """The keys more than one sample row has, counted in Arrow; None (track every key) for other sequences."""
    if not isinstance(samples, Samples):
        return None
    counts = pc.value_counts(samples.table["key"])
    return set(counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist())


def check(samples: list[Sample]) -> None:
    """Refuse, before anything is written, samples a loader would read inconsistently: the message names the field."""
    if not samples:
        return
    first = samples[0]
    extensions, keys = set(first.media), set(first.meta)
    types: dict[str, tuple[str, str]] = {}
    seen: dict[str, str] = {}
    repeated = _repeated_keys(samples)
    for sample in samples:
        if not sample.key or "." in sample.key or "/" in sample.key:
            raise InputError(f"id {sample.id!r}: key {sample.key!r} must be non-empty and free of '.' and '/' "
                             "(WebDataset and HF split a member's name at its first dot)")
        if sample.key in seen:
            raise InputError(f"key {sample.key!r} is shared by ids {seen[sample.key]!r} and {sample.id!r}")
        if repeated is None or sample.key in repeated:
            seen[sample.key] = sample.id
        if set(sample.media) != extensions:
            raise InputError(f"id {sample.id!r}: media extensions {sorted(sample.media)} differ from "
                             f"{sorted(extensions)} of id {first.id!r}: every sample carries the same files")
        for ext in sample.media:
            if ext in GENERATED or not _EXTENSION.fullmatch(ext):
                raise InputError(f"id {sample.id!r}: media extension {ext!r} must match {_EXTENSION.pattern} "
                                 f"and not be one the format writes ({', '.join(GENERATED)})")
        video_extension(sample)
        if set(sample.meta) != keys:
            missing, extra = sorted(keys - set(sample.meta)), sorted(set(sample.meta) - keys)
            raise InputError(f"id {sample.id!r}: meta keys differ from those of id {first.id!r} "
                             f"(missing {missing}, extra {extra}): HF infers a sample's fields from the first ones")
        for field_name, own in (("key", sample.key), ("caption", sample.caption)):
            if field_name in sample.meta and sample.meta[field_name] != own:
                raise InputError(f"id {sample.id!r}: meta[{field_name!r}]={sample.meta[field_name]!r} would be "
                                 f"replaced by the sample's {field_name} {own!r}")
        for name, value in sample.meta.items():
            kind = _json_type(value)
            if kind is None:
                continue
            earlier = types.setdefault(name, (kind, sample.id))
            if earlier[0] != kind:
                raise InputError(f"meta[{name!r}] is {earlier[0]} in id {earlier[1]!r} but {kind} in id "
                                 f"{sample.id!r} ({value!r}): a field keeps one type in every sample")
        _metadata(sample)
    card = dataset_card(samples)
    if isinstance(samples, Samples):
        samples.memo[CARD] = card


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A regular file's header with every field but name and size fixed."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def build_shard(unit: Unit, source: Storage) -> tuple[bytes, list[int]]:
    """The tar of a unit and the byte offset of each sample's first member header (in unit order).

    PAX, so a key of any length fits (a long name gets an extended header, where the sample's offset then points)."""
    buffer = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for sample in unit.samples:
            offsets.append(tar.offset)
            video = video_extension(sample)
            for ext in member_extensions(sample):
                if ext == video:
                    data = read_video(source, sample, ext)
                elif ext == "json":
                    data = _metadata(sample)
                elif ext == "txt":
                    data = sample.caption.encode("utf-8")
                else:
                    data = source.get_bytes(sample.media[ext])
                tar.addfile(_member(f"{sample.key}.{ext}", len(data)), io.BytesIO(data))
    return buffer.getvalue(), offsets


def shard_path(unit: Unit) -> str:
    """The shard's key at DEST's root: `{unit.name}.tar`."""
    if not _UNIT_NAME.fullmatch(unit.name):
        raise ValueError(f"unit name must match {_UNIT_NAME.pattern}, got {unit.name!r}")
    return f"{unit.name}.tar"


def write_unit(unit: Unit, source: Storage, dest: Storage) -> list[IndexRow]:
    """Build the unit's shard and publish it create-only (the same bytes already there are accepted)."""
    path = shard_path(unit)
    data, offsets = build_shard(unit, source)
    publish_once(dest, path, data)
    return [
        IndexRow(key=s.key, id=s.id, split=s.split, unit=unit.name, path=path, offset=offset, sha256=s.sha256,
                 bytes=s.bytes)
        for s, offset in zip(unit.samples, offsets)
    ]


class _Shape:
    """The JSON types one field takes over every sample, nested, gathered a value at a time: a card over a million
    samples holds one shape per field, not every sample's metadata."""

    __slots__ = ("kinds", "items", "fields")

    def __init__(self):
        self.kinds: set[str] = set()
        self.items: _Shape | None = None
        self.fields: dict[str, _Shape] = {}

    def add(self, value) -> None:
        kind = _json_type(value)
        if kind is None:
            return
        self.kinds.add(kind)
        if kind == "list":
            self.items = self.items or _Shape()
            for item in value:
                self.items.add(item)
        elif kind == "object":
            for name, item in value.items():
                self.fields.setdefault(name, _Shape()).add(item)

    def feature(self, path: str) -> dict:
        """The HF feature (as its dataset card spells it) of the non-null values seen."""
        kinds = self.kinds
        if not kinds:
            return {"dtype": "null"}
        if kinds == {"integer", "float"}:
            kinds = {"float"}  # a nested list of numbers: Arrow promotes to double as well
        if len(kinds) > 1:
            raise InputError(f"meta field {path} holds values of types {sorted(kinds)}: a field keeps one type")
        (kind,) = kinds
        if kind in _HF_SCALARS:
            return {"dtype": _HF_SCALARS[kind]}
        if kind == "list":
            inner = (self.items or _Shape()).feature(f"{path}[]")
            return {"list": inner.get("dtype") or inner.get("struct") or inner}
        return {"struct": [{"name": n, **self.fields[n].feature(f"{path}.{n}")} for n in sorted(self.fields)]}


def dataset_card(samples: list[Sample]) -> bytes | None:
    """A dataset card declaring every member's HF feature from all samples, or None where HF decodes a member itself.

    `load_dataset(DEST)` reads it instead of inferring types from the first 5 samples, which types a field
    null (and then fails on the first value) when those 5 hold only nulls."""
    extensions = member_extensions(samples[0])
    if any(ext.rsplit(".", 1)[-1] in _HF_DECODED for ext in extensions):
        return None
    features = []
    for ext in extensions:
        if ext == "json":
            shape = _Shape()
            for sample in samples:
                shape.add(json.loads(_metadata(sample)))
            features.append({"name": ext, **shape.feature("json")})
        else:
            features.append({"name": ext, "dtype": "string" if ext == "txt" else _HF_MEDIA.get(ext, "binary")})
    features += [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    text = yaml.safe_dump({"dataset_info": {"features": features}}, sort_keys=False, allow_unicode=True)
    return f"---\n{text}---\n\nWebDataset shards written by `kandinsky-batch export --format webdataset`.\n".encode()


def finish(dest: Storage, index: pa.Table, samples: list[Sample]) -> None:
    """Replace the dataset card at DEST's root, so HF types every field from all samples, not the first five
    (the card `check` made when these are the samples it checked); left untouched when it already says that."""
    if isinstance(samples, Samples) and CARD in samples.memo:
        card = samples.memo[CARD]
    else:
        card = dataset_card(samples) if samples else None
    if card is not None:
        replace(dest, CARD, card)
