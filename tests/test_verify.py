"""verify(): a good output is clean; each kind of damage is reported with the offending id or key."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pytest

from kandinsky_batch.output.manifest import ManifestWriter, read_manifest
from kandinsky_batch.output.success import write_success
from kandinsky_batch.output.poster import poster
from kandinsky_batch.output.storage import Storage
from kandinsky_batch.output.layout import object_key, poster_key
from kandinsky_batch.output.verify import VerifyError, verify
from tests.helpers import compact



def make_output(uri: str, options: dict | None, posters: bool = True) -> Storage:
    """A finished output: three ok videos (with posters unless written before posters existed), one failed row,
    compacted manifest, _SUCCESS."""
    storage = Storage(uri, options)
    writer = ManifestWriter(storage, "run1", flush_rows=2)
    for i in range(3):
        writer.add(_ok_row(storage, f"clip-{i}", i, posters))
    writer.add({"id": "clip-3", "row_index": 3, "status": "failed", "error": "boom"})
    writer.flush()
    compact(storage, "run1")
    write_success(storage, {"rows": 4, "ok": 3, "failed": 1})
    return storage


def _ok_row(storage: Storage, row_id: str, i: int, with_poster: bool = True) -> dict:
    data = f"video {i} ".encode() * (i + 10)
    key = object_key(row_id, "mp4")
    storage.put_bytes(key, data)
    row = {"id": row_id, "row_index": i, "status": "ok", "uri": storage.url(key), "bytes": len(data),
           "sha256": hashlib.sha256(data).hexdigest(), "format": "mp4", "finished_at": datetime.now(timezone.utc)}
    if with_poster:
        frames = np.random.default_rng(i).integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
        storage.put_bytes(poster_key(row_id), poster(frames))
        row["poster"] = storage.url(poster_key(row_id))
    return row


def test_good_output_is_clean(output_target):
    make_output(*output_target)
    assert verify(*output_target) == []


def test_missing_object_is_reported(output_target):
    storage = make_output(*output_target)
    storage.delete("videos/clip-1.mp4")
    assert verify(*output_target) == ["id='clip-1': object videos/clip-1.mp4 is missing"]


def test_corrupted_object_same_size_is_reported(output_target):
    storage = make_output(*output_target)
    data = bytearray(storage.get_bytes("videos/clip-0.mp4"))
    data[3] ^= 0xFF
    storage.put_bytes("videos/clip-0.mp4", bytes(data))
    [problem] = verify(*output_target)
    assert problem.startswith("id='clip-0': object videos/clip-0.mp4 has sha256")


def test_truncated_object_is_reported(output_target):
    storage = make_output(*output_target)
    data = storage.get_bytes("videos/clip-2.mp4")
    storage.put_bytes("videos/clip-2.mp4", data[:-5])
    [problem] = verify(*output_target)
    assert f"has {len(data) - 5} bytes, manifest says {len(data)}" in problem and "clip-2" in problem


def test_stray_object_is_reported(output_target):
    storage = make_output(*output_target)
    storage.put_bytes("videos/orphan.mp4", b"nobody's")
    assert verify(*output_target) == ["stray object videos/orphan.mp4: no ok manifest row refers to it"]


def test_missing_success_and_duplicate_ids_are_reported(output_target):
    storage = make_output(*output_target)
    storage.delete("_SUCCESS")
    late = ManifestWriter(storage, "run2")
    late.add({"id": "clip-3", "row_index": 3, "status": "failed", "error": "again"})
    late.flush()
    problems = verify(*output_target)
    assert len(problems) == 2
    assert "_SUCCESS is missing" in problems[0]
    assert "1 input rows recorded twice" in problems[1] and "('clip-3', 3)" in problems[1]


def test_two_ok_rows_for_one_id_are_reported(output_target):
    storage = make_output(*output_target)
    first = read_manifest(storage).to_pylist()[0]
    late = ManifestWriter(storage, "run2")
    late.add({**first, "row_index": 7})  # the same id committed again as another input row
    late.flush()
    assert verify(*output_target) == [f"id={first['id']!r}: more than one ok row (one object key per id)"]


def test_empty_output_is_refused_as_no_output(output_target):
    with pytest.raises(VerifyError, match="no such file or directory"):
        verify(*output_target)


def test_output_without_success_reports_it(output_target):
    Storage(*output_target).put_bytes("manifest/.keep", b"")
    problems = verify(*output_target)
    assert any("_SUCCESS is missing" in p for p in problems)
    assert any("manifest is missing" in p for p in problems)


def test_missing_poster_is_reported(output_target):
    storage = make_output(*output_target)
    storage.delete("posters/clip-1.jpg")
    assert verify(*output_target) == ["id='clip-1': poster posters/clip-1.jpg is missing"]


def test_corrupt_or_truncated_poster_is_reported(output_target):
    storage = make_output(*output_target)
    storage.put_bytes("posters/clip-0.jpg", b"not a jpeg at all")
    good = storage.get_bytes("posters/clip-2.jpg")
    storage.put_bytes("posters/clip-2.jpg", good[: len(good) * 3 // 4])  # headers intact, scan cut short
    problems = verify(*output_target)
    assert len(problems) == 2, problems
    assert problems[0].startswith("id='clip-0': poster posters/clip-0.jpg does not decode")
    assert problems[1].startswith("id='clip-2': poster posters/clip-2.jpg does not decode")
    assert "truncated" in problems[1]  # Image.verify() alone passes a JPEG whose scan is cut short


def test_stray_poster_is_reported(output_target):
    storage = make_output(*output_target)
    storage.put_bytes("posters/orphan.jpg", poster(np.zeros((1, 8, 8, 3), np.uint8)))
    assert verify(*output_target) == ["stray object posters/orphan.jpg: no ok manifest row refers to it"]


def test_a_failed_rows_poster_is_a_stray(output_target):
    storage = make_output(*output_target)
    storage.put_bytes(poster_key("clip-3"), poster(np.zeros((1, 8, 8, 3), np.uint8)))
    assert verify(*output_target) == ["stray object posters/clip-3.jpg: no ok manifest row refers to it"]


def test_ok_row_without_a_poster_is_reported_once_the_output_has_posters(output_target):
    storage = make_output(*output_target)
    late = ManifestWriter(storage, "run2")
    late.add({k: v for k, v in _ok_row(storage, "clip-4", 4).items() if k != "poster"})
    late.flush()
    assert verify(*output_target) == ["id='clip-4': ok row has no poster", "stray object posters/clip-4.jpg: "
                                      "no ok manifest row refers to it"]


def test_rows_written_before_posters_existed_pass(output_target):
    storage = make_output(*output_target, posters=False)
    assert verify(*output_target) == []
    # Resumed by a version with posters: the old rows keep none, the new row has one, and later rows must.
    late = ManifestWriter(storage, "run2")
    late.add({**_ok_row(storage, "clip-4", 4), "row_index": 4})
    late.flush()
    assert verify(*output_target) == []
    later = ManifestWriter(storage, "run3")
    later.add(_ok_row(storage, "clip-5", 5, with_poster=False))
    later.flush()
    assert verify(*output_target) == ["id='clip-5': ok row has no poster"]
