"""verify(): a good output is clean; each kind of damage is reported with the offending id or key."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from kandinsky_batch.manifest import ManifestWriter, compact, read_manifest, write_success
from kandinsky_batch.storage import Storage, object_key
from kandinsky_batch.verify import verify


def make_output(uri: str, options: dict | None) -> Storage:
    """A finished output: three ok videos, one failed row, compacted manifest, _SUCCESS."""
    storage = Storage(uri, options)
    writer = ManifestWriter(storage, "run1", flush_rows=2)
    for i in range(3):
        data = f"video {i} ".encode() * (i + 10)
        key = object_key(f"clip-{i}", "mp4")
        storage.put_bytes(key, data)
        writer.add(
            {
                "id": f"clip-{i}",
                "row_index": i,
                "status": "ok",
                "uri": storage.url(key),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "format": "mp4",
                "finished_at": datetime.now(timezone.utc),
            }
        )
    writer.add({"id": "clip-3", "row_index": 3, "status": "failed", "error": "boom"})
    writer.flush()
    compact(storage, "run1")
    write_success(storage, {"rows": 4, "ok": 3, "failed": 1})
    return storage


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


def test_empty_output_reports_missing_manifest(output_target):
    problems = verify(*output_target)
    assert any("_SUCCESS is missing" in p for p in problems)
    assert any("manifest is missing" in p for p in problems)
