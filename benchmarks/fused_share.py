"""What fused scoring adds to a CPU replica's time on the tiny demo job: per metric, the seconds to score one
committed video against the seconds the replica spent rendering it.

Renders `configs/tiny.yaml` (the demo's prompts, 64x64, 17 frames, 4 steps, mp4) with one in-process replica, then,
for each committed video, decodes its bytes and scores it with each weight-free metric through the fused path's
own functions (`fleet/score_worker.py`: `decode_video`, `score_video`) on this one thread. The share is
score / (render + score): how much longer the replica would be busy per video.

    .venv/bin/python benchmarks/fused_share.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import machine, table, write_json  # noqa: E402
from kandinsky_batch.config.load import load_config  # noqa: E402
from kandinsky_batch.fleet.score_worker import decode_video, load_scorers, score_video  # noqa: E402
from kandinsky_batch.job import run  # noqa: E402
from kandinsky_batch.output.manifest import read_manifest# noqa: E402
from kandinsky_batch.output.storage import Storage  # noqa: E402
from pipelines.scoring.registry import METRICS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    out = Path(tempfile.mkdtemp(prefix="fused-share-")) / "demo"
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [f"output.uri={out}", "cluster.address=inprocess",
                                                            "cluster.replicas=1"])
    run(cfg, progress=False)
    storage = Storage(str(out))
    rows = [r for r in read_manifest(storage).to_pylist() if r["status"] == "ok"]
    render = sum(r["render_seconds"] for r in rows) / len(rows)
    names = sorted(n for n, m in METRICS.items() if m.weights is None)
    scorers = load_scorers(names)
    seconds = {name: 0.0 for name in names}
    decode = 0.0
    for row in rows:
        data = storage.get_bytes(row["key"])
        started = time.perf_counter()
        video = decode_video(data, row["key"], row["fps"], row["prompt"])
        decode += time.perf_counter() - started
        for name in names:
            started = time.perf_counter()
            score_video(scorers, video, [name])
            seconds[name] += time.perf_counter() - started
    per = {name: s / len(rows) for name, s in seconds.items()}
    decode /= len(rows)
    total = decode + sum(per.values())
    lines = [(name, f"{1000 * s:.1f}", f"{100 * s / (render + s):.1f} %") for name, s in per.items()]
    lines += [("(decode, once)", f"{1000 * decode:.1f}", f"{100 * decode / (render + decode):.1f} %"),
              ("all weight-free", f"{1000 * total:.1f}", f"{100 * total / (render + total):.1f} %")]
    print(f"tiny demo job: {len(rows)} videos, render {render:.2f} s a video on one thread ({machine()['cpu']})")
    print(table(["metric", "ms / video", "share of replica time"], lines))
    write_json("fused_share", {"machine": machine(), "videos": len(rows), "render_seconds": render,
                               "decode_seconds": decode, "metric_seconds": per, "all_seconds": total})


if __name__ == "__main__":
    main()
