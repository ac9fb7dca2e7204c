"""The console of a job: `--version`, the phase line until the bar moves, the model libraries' bars kept off.

A real job's stderr is checked end to end in `tests/test_security.py` (it runs the CLI through Ray)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kandinsky_batch.cli import main
from kandinsky_batch.progress import Progress, checking, loading
from pipelines.console import QUIET_ENV

ROOT = Path(__file__).resolve().parents[1]


class Stream(io.StringIO):
    """A stderr that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == "kandinsky-batch 0.1.0\n"


@pytest.mark.parametrize("tty", [True, False])
def test_each_phase_shows_at_once_then_rendering_once_a_batch_is_dispatched(tty):
    stream = Stream(tty)
    bar = Progress(4, "run", enabled=True, stream=stream)
    intake = SimpleNamespace(counts=SimpleNamespace(skipped=0))
    queue = SimpleNamespace(first_dispatch=None, queued=lambda: 0, slots=[], restarts=0,
                            drains=SimpleNamespace(drains=0))
    bar.phase("starting Ray…")
    bar.phase(loading(["tiny"], 2))
    bar.update(intake, queue)  # no batch out yet: the phase stays
    assert stream.getvalue().split("\r")[-1].startswith("loading model tiny on 2 replicas…:   0%")
    queue.first_dispatch = 1.0
    bar.update(intake, queue)
    bar.settled("ok")
    bar.update(intake, queue)
    bar.bar.close()
    lines = [line for line in stream.getvalue().split("\r") if line.strip()]
    phases = [line.split(":")[0] for line in lines]
    assert phases[:3] == ["reading rows…", "starting Ray…", "loading model tiny on 2 replicas…"]
    assert set(phases[3:]) == {"rendering"} and "1/4" in lines[-1]


def test_a_disabled_bar_writes_nothing():
    stream = Stream(True)
    bar = Progress(4, "run", enabled=False, stream=stream)
    bar.phase("starting Ray…")
    bar.bar.close()
    assert stream.getvalue() == ""


def test_loading_names_every_model_of_a_sweep_and_counts_replicas():
    assert loading(["tiny"], 1) == "loading model tiny on 1 replica…"
    assert loading(["tiny", "tiny-b"], 4) == "loading models tiny, tiny-b on 4 replicas…"


def test_checking_input_shows_on_a_terminal_only_and_is_erased_even_on_refusal():
    terminal = Stream(True)
    with pytest.raises(ValueError):
        with checking(True, terminal):
            assert terminal.getvalue() == "checking input…"
            raise ValueError("refused")
    assert terminal.getvalue() == "checking input…\r\x1b[K"
    for stream, enabled in ((Stream(False), True), (Stream(True), False)):
        with checking(enabled, stream):
            pass
        assert stream.getvalue() == ""  # a log file or --no-progress: a refusal's stderr stays its error line


def test_quiet_progress_keeps_the_tiny_build_off_stderr(tmp_path):
    """Saving the tiny preset (what a job's preflight does in the driver) prints transformers' "Writing model
    shards" bar; after `quiet_progress` it prints nothing, whether the libraries were imported before or not."""
    # Qwen's vocabulary (pure data, no output) is derived by the first build and reused by the other two.
    vocab = str(tmp_path / "vocab.pickle")
    after_import = f"""
import sys
from pipelines import save_tiny
from pipelines.console import quiet_progress
from tests.tiny_vocab import vocab_once
with vocab_once({vocab!r}):
    save_tiny({str(tmp_path / 'loud')!r})
    print("--- quiet ---", file=sys.stderr, flush=True)
    quiet_progress()
    save_tiny({str(tmp_path / 'quiet')!r})
"""
    before_import = f"""
from pipelines.console import quiet_progress
quiet_progress()
from pipelines import save_tiny
from tests.tiny_vocab import vocab_once
with vocab_once({vocab!r}):
    save_tiny({str(tmp_path / 'first')!r})
"""
    # Fresh processes with the bars' default: a job run earlier in this test process has turned them off in its
    # environment (quiet_progress), and a child would inherit that. One after the other: the second reads the
    # vocabulary the first wrote.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    procs = [subprocess.run([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            timeout=300) for script in (after_import, before_import)]
    after, before = (proc.stderr for proc in procs)
    assert [proc.returncode for proc in procs] == [0, 0], after[-2000:] + before[-2000:]
    loud, quiet = after.split("--- quiet ---\n")
    assert "Writing model shards" in loud  # the positive control: the bar is there to be silenced
    assert quiet == "" and before == ""
