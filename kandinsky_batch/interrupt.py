"""SIGINT and SIGTERM stop a job: the driver's own handlers, not Python's or Ray's defaults.

Python raises `KeyboardInterrupt` wherever the main thread happens to be (between a replica's result and its
manifest row, say), and leaves SIGINT ignored when the parent ignored it (a `cmd &` in a script); Ray's
`init` replaces the SIGTERM handler (its local node drains for up to `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`,
and its core worker's handler aborts the process). So `run` installs these handlers, again after Ray starts:
the first signal asks the job to stop (the work queue and the front end look at `requested` between steps,
and read-only phases are left at once), a second one exits at once.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

from kandinsky_batch.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now(signum: int) -> None:
    """A second signal: no cleanup. Ray's processes die with the driver (they share its fate); rows already
    published are kept, and objects without a manifest row are adopted by the re-run."""
    os.write(2, f"interrupted again ({signal.Signals(signum).name}): exiting now\n".encode())
    os._exit(128 + signum)


class StopSignals:
    """While entered (in the main thread), SIGINT/SIGTERM set `requested`; inside `abortable()` they raise
    `Interrupted` at once (phases that only read). A second signal exits the process with 128 + signum."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._abortable = 0
        self._saved: dict[int, object] = {}
        self._wakeup: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.getsignal(s) for s in SIGNALS}
            self.install()
            # Python runs a handler only once the main thread is back in Python code, which a blocking call
            # (Ray's shutdown) may delay; each signal also writes its number to the wakeup fd at once, so a
            # watcher thread sees the second one whatever the main thread is doing.
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            self._wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._sockets = (reader, writer)
            threading.Thread(target=self._watch, args=(reader,), name="stop-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.signum is not None or not self._saved:
            return  # stopping: keep ours, so that another signal before the process ends exits at once
        signal.set_wakeup_fd(self._wakeup if self._wakeup is not None else -1)
        self._sockets[1].close()  # the watcher reads the end of it, and closes its side
        for signum, handler in self._saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _watch(self, reader: socket.socket) -> None:
        seen = 0
        try:
            while data := reader.recv(64):
                for signum in data:
                    if signum in SIGNALS:
                        seen += 1
                        if seen >= 2:
                            _exit_now(signum)
        except OSError:
            pass
        finally:
            reader.close()  # the job ended without a second signal

    def install(self) -> None:
        """(Re)install the handlers: call again after `ray.init`, which replaces SIGTERM's."""
        if self._saved:
            for signum in SIGNALS:
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            _exit_now(signum)
        self.signum = signum
        if self._abortable:
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise `Interrupted` if a signal came."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextmanager
    def abortable(self) -> Iterator[None]:
        """A phase that writes nothing (preflight, waiting for the first window): a signal ends it at once."""
        self.check()
        self._abortable += 1
        try:
            yield
        finally:
            self._abortable -= 1
