"""Run several `kandinsky-batch` command lines one after another in this one fresh process, through the entry
point `kandinsky_batch.cli:main` the console script calls, and report each one's exit status, stdout, stderr, and
whether `ray` had been imported by its end. A refusal test pays one interpreter start for all its cases.

Usage: python -m tests.cli_batch CASES.json RESULTS.json, where CASES.json is a list of {"args", "env", "cwd"}.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings


def _captured(fd: int, run):
    """`run()` with file descriptor `fd` (1 or 2) written into a temp file; (its result, what was written)."""
    stream = sys.stdout if fd == 1 else sys.stderr
    stream.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            result = run()
        finally:
            stream.flush()
            os.dup2(saved, fd)
            os.close(saved)
        sink.seek(0)
        return result, sink.read().decode("utf-8", "replace")


def _main_exit(args: list[str]) -> int:
    from kandinsky_batch.cli import main

    try:
        return int(main(args) or 0)
    except SystemExit as stop:  # argparse's own refusals exit
        return stop.code if isinstance(stop.code, int) else 1


def run_case(case: dict) -> dict:
    """One command line, its environment set for it alone and its output captured at the descriptors."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(case.get("env", {}))
    os.chdir(case.get("cwd", saved_cwd))
    # Each case sees warnings as a process of its own would: once per place, not once per batch.
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    try:
        with warnings.catch_warnings():
            (code, stdout), stderr = _captured(2, lambda: _captured(1, lambda: _main_exit(case["args"])))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return {"returncode": code, "stdout": stdout, "stderr": stderr, "ray_imported": "ray" in sys.modules}


def run_here(case: dict) -> dict:
    """`run_case` in a test's own process: what the CLI prints goes to the process's streams, so it reaches the
    descriptors captured (pytest's stand-ins for sys.stdout and sys.stderr write elsewhere)."""
    with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
        return run_case(case)


if __name__ == "__main__":
    cases_path, results_path = sys.argv[1:3]
    with open(cases_path) as handle:
        cases = json.load(handle)
    assert "ray" not in sys.modules
    results = [run_case(case) for case in cases]
    with open(results_path, "w") as handle:
        json.dump(results, handle)
