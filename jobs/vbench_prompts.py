"""Write the input a VBench sweep renders: one row per distinct prompt of VBench's standard prompt suite.

    pip download vbench==0.1.5 --no-deps          # the wheel only: never install it beside the project
    python jobs/vbench_prompts.py vbench-0.1.5-py3-none-any.whl [jobs/vbench-prompts.parquet]

The suite (`vbench/VBench_full_info.json`, read from the wheel or given as the JSON itself) has 946 entries of 944
distinct `prompt_en`: two prompts serve several dimensions from two entries, whose `dimension` lists are merged.
Each row: `id` (from the prompt, deterministic and dot-free), `prompt` (the exact `prompt_en`, which the vbench
export names files by) and `dimension` (a list, carried through to the manifest).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FULL_INFO = "vbench/VBench_full_info.json"
DEFAULT_OUT = Path(__file__).with_name("vbench-prompts.parquet")
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("dimension", pa.list_(pa.string()))])


def read_full_info(path: str | Path) -> list[dict]:
    """The suite's entries, from the wheel (a zip) or from the JSON file itself."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if FULL_INFO not in wheel.namelist():
                raise SystemExit(f"{path}: no {FULL_INFO} inside; expected the vbench 0.1.5 wheel")
            return json.loads(wheel.read(FULL_INFO))
    return json.loads(path.read_text(encoding="utf-8"))


def prompt_id(prompt: str) -> str:
    """A readable, dot-free id: the prompt's first words folded to `[a-z0-9-]`, then a hash of the whole prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-")
    return f"{slug}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:10]}"


def prompt_rows(entries: list[dict]) -> list[dict]:
    """One row per distinct `prompt_en`, in the suite's order, its dimensions merged in order of appearance."""
    by_prompt: dict[str, list[str]] = {}
    for position, entry in enumerate(entries):
        prompt, dimensions = entry.get("prompt_en"), entry.get("dimension")
        if not isinstance(prompt, str) or not isinstance(dimensions, list):
            raise SystemExit(f"entry {position}: needs a string prompt_en and a dimension list, got {entry!r}")
        merged = by_prompt.setdefault(prompt, [])
        merged.extend(d for d in dimensions if d not in merged)
    rows = [{"id": prompt_id(p), "prompt": p, "dimension": d} for p, d in by_prompt.items()]
    if len({row["id"] for row in rows}) != len(rows):
        raise SystemExit("two prompts got the same id; lengthen the hash in prompt_id")
    return rows


def main(argv: list[str]) -> None:
    if len(argv) not in (1, 2):
        raise SystemExit(__doc__)
    out = Path(argv[1]) if len(argv) == 2 else DEFAULT_OUT
    entries = read_full_info(argv[0])
    rows = prompt_rows(entries)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out)
    print(f"wrote {len(rows)} prompts ({len(entries)} suite entries) to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
