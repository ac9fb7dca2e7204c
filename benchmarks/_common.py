"""What every benchmark shares: the machine it ran on, a printed table, the JSON it leaves behind."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    """Where and with what a figure was measured: cores, memory, CPU/GPU model, library versions, commit."""
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cores": os.cpu_count(),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    for name in ("torch", "diffusers", "transformers", "ray", "av"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    # A tree copied without .git (an exported snapshot, the GPU machine) names its commit through the environment.
    info["commit"] = commit or os.environ.get("KB_BENCH_COMMIT")
    info["loadavg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return info


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes into RESULTS.md as it is)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_json(name: str, data: dict, out: str | None = None) -> Path:
    """Write `benchmarks/results/{name}.json` (or `out`) and return its path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


class HostWatch:
    """Samples host memory and per-process CPU time in a thread, so a window of a run can be accounted for.

    `peak_gib`: the most memory in use (MemTotal - MemAvailable) seen; `cpu_by_process(t0, t1)`: CPU seconds
    spent between two wall-clock times, grouped by process name (this process is `driver`).
    """

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_gib = interval, 0.0
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "HostWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_gib = max(self.peak_gib, used_gib())
            self.samples.append((time.time(), _cpu_by_pid()))
            self._stop.wait(self.interval)

    def cpu_by_process(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per process name between the samples nearest to `t0` and `t1` (wall-clock)."""
        if not self.samples:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - t0))
        last = min(self.samples, key=lambda s: abs(s[0] - t1))
        spent: dict[str, float] = {}
        for pid, (name, seconds) in last[1].items():
            before = first[1].get(pid, (name, 0.0))[1] if pid in first[1] else 0.0
            spent[name] = spent.get(name, 0.0) + max(0.0, seconds - before)
        spent["(window s)"] = last[0] - first[0]
        return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    """{pid: (name, user+system CPU seconds)} for every process we can read."""
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        found[int(entry)] = ("driver" if int(entry) == me else name, (int(fields[11]) + int(fields[12])) / _TICK)
    return found


def used_gib() -> float:
    """Host memory in use, GiB (0 where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in f}
    except OSError:
        return 0.0
    return (fields["MemTotal"] - fields["MemAvailable"]) / 2**20
