"""Benchmark 3, GPU: every GPU check as one command, each part in its own process with its own time limit.

Parts, in order (a part that fails or runs out of time loses only its own figures):
  contract  the seed contract on CUDA: `pipelines/` against plain diffusers, fp32 and bf16 (gpu_contract.py)
  step      Lite-size DiT step per option and VAE decode at 5 s 768x512, against 139 s (gpu_step.py)
  overlap   the render actor's two threads over consecutive real-size rows: GPU busy fraction (gpu_overlap.py)
  memory    peak memory of a whole replica, text encoders resident then moved out whole, and a Pro-size DiT
  offload   encoding with the text encoders group-offloaded (the product's `model.offload_text_encoder`)
  nabla10s  a 10 s clip: the fastest dense backend against NABLA (blocks eager, flex compiled) (gpu_step.py)
  compile   NABLA with the whole blocks compiled, 10 s (slow to compile: >100 s on an H200)
  k6        Kandinsky 6 Lite-size guided step (video + audio, 1024-token masked prompt) per mask-taking backend
            and compiled, and its video and audio decodes, 5 s 768x512 (gpu_k6.py; ~2 minutes, estimated)
The fastest eager attention backend that `step` finds is what `memory` and `nabla10s` use.
Measured part times on an H200 (2026-11-26): contract 45 s, step 110 s, overlap 125 s, memory 65 s,
nabla10s ~75 s: with a machine's start, all of it does not fit one 10-minute command; split with `--parts`.

    python benchmarks/gpu.py --out-dir "$OUT" --parts contract,step,overlap      # on the GPU, ~5 minutes
    python benchmarks/gpu.py --out-dir "$OUT" --parts memory,offload,nabla10s,compile
    python benchmarks/gpu.py --out-dir "$OUT" --parts k6
    .venv/bin/python benchmarks/gpu.py --tiny --out-dir /tmp/gpu     # dry run on the CPU at tiny dims
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("contract", "step", "overlap", "memory", "offload", "nabla10s", "compile", "k6")
BUDGET_S = {"contract": 90, "step": 210, "overlap": 150, "memory": 110, "offload": 90, "nabla10s": 150,
            "compile": 300, "k6": 180}


def part_command(part: str, tiny: bool, best: str, out: Path) -> list[str]:
    """The part's script and arguments (`tiny`: CPU-size smoke test of the same code paths)."""
    small = ["--dims", "tiny", "--device", "cpu"] if tiny else []
    clip5, clip10 = ("tiny", "tiny10s") if tiny else ("5s", "10s")
    json_out = ["--out", str(out / f"gpu_{part}.json")]
    if part == "contract":
        return ["gpu_contract.py", *(["--device", "cpu"] if tiny else []), *json_out]
    if part == "step":
        return ["gpu_step.py", *small, "--clip", clip5, *json_out]
    if part == "overlap":
        return ["gpu_overlap.py", *small, "--clip", clip5, *json_out]
    if part == "memory":
        return ["gpu_memory.py", *small, "--clip", clip5, "--backend", best, "--parts", "whole,pro", *json_out]
    if part == "offload":
        return ["gpu_memory.py", *small, "--clip", clip5, "--parts", "streamed", *json_out]
    if part == "nabla10s":
        return ["gpu_step.py", *small, "--clip", clip10, "--decode", "framewise", "--configs", f"{best},flex+nabla",
                *json_out]
    if part == "compile":
        return ["gpu_step.py", *small, "--clip", clip10, "--decode", "", "--configs", "flex+nabla+compile", *json_out]
    if part == "k6":
        return ["gpu_k6.py", *small, "--clip", clip5, *json_out]
    raise ValueError(f"unknown part {part!r} (parts: {', '.join(PARTS)})")


def fastest_backend(step_json: Path) -> str:
    """The eager attention backend with the shortest step in the `step` part ('native' if none ran)."""
    try:
        results = json.loads(step_json.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return "native"
    eager = [r for r in results if "step_s" in r and "+" not in r["config"]]
    return min(eager, key=lambda r: r["step_s"])["config"] if eager else "native"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True, help="where each part writes gpu_<part>.json, plus gpu.log")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--deadline", type=float, default=470, help="seconds for all parts together")
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU at tiny dims")
    args = parser.parse_args()

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "KANDINSKY_BATCH_CACHE": os.environ.get("KANDINSKY_BATCH_CACHE", "/tmp/kb-cache")}
    started, summary = time.monotonic(), []
    with open(out / "gpu.log", "a") as log:
        for part in args.parts.split(","):
            left = args.deadline - (time.monotonic() - started)
            if left < 20:
                summary.append((part, "skipped: out of time", 0.0))
                continue
            best = fastest_backend(out / "gpu_step.json")
            command = [sys.executable, str(HERE / part_command(part, args.tiny, best, out)[0]),
                       *part_command(part, args.tiny, best, out)[1:]]
            print(f"## {part}: {' '.join(command[1:])} (limit {min(BUDGET_S[part], left):.0f} s)", flush=True)
            log.write(f"## {part}: {' '.join(command)}\n")
            log.flush()
            t0 = time.monotonic()
            try:
                done = subprocess.run(command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                      timeout=min(BUDGET_S[part], left))
                print(done.stdout, flush=True)
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            except subprocess.TimeoutExpired as exc:
                print(exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), flush=True)
                status = "timed out"
            summary.append((part, status, time.monotonic() - t0))
    for part, status, seconds in summary:
        print(f"{part:9s} {status:22s} {seconds:6.1f} s")
    return 0 if all(status == "ok" for _, status, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
