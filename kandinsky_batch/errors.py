"""Every error the system raises for a person to read: what each means and how the CLI answers it.

The CLI prints each in one line, no traceback: exit 2 for input to fix (config, dataset, model path, resume
conflicts, verify/report/reproduce targets), exit 3 for a job stopped early with its progress kept, 130/143 on a signal.
"""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A config key has a bad or missing value; the message names the key and the value."""


class InputError(ValueError):
    """The input dataset as a whole cannot be used; the message says why in one line."""


class ResumeConflict(ValueError):
    """The output prefix holds rows rendered with other parameters; mixing them needs --force."""


class ReportError(ValueError):
    """The output cannot be reported as asked (no manifest, an unknown axis); the message names the value."""


class VerifyError(ValueError):
    """The target is not an output prefix at all (missing, a file, a folder no job wrote): one line, exit 2."""


class ReproduceError(ValueError):
    """`reproduce` has no row to re-render: not an output, an unknown id, a row not ok: one line, exit 2."""


class LeaseHeld(ValueError):
    """Another job holds the output prefix's lease and its heartbeat is fresh: one job per prefix (exit 2)."""


class LeaseLost(RuntimeError):
    """This job's lease on its output prefix lapsed or was taken over: it stopped committing; what landed is kept."""


class WorkersFailed(RuntimeError):
    """Replicas could not be started or none could run for too long; the job cannot make progress."""


class StorageOutage(RuntimeError):
    """The output store stayed unreachable beyond its retry budget; progress so far is kept."""


class StorageUnavailable(RuntimeError):
    """Transient storage errors outlasted the retry budget."""

    def __init__(self, key: str, last_error: BaseException) -> None:
        self.key = key
        self.last_error = last_error
        super().__init__(f"storage unavailable for key {key!r}: {type(last_error).__name__}: {last_error}")

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions raised in actors; the default would call __init__ with the message only.
        return (type(self), (self.key, self.last_error))


class Interrupted(Exception):
    """The job stopped on a signal; what it had committed is published."""

    def __init__(self, signum: int, committed: int = 0, in_output: int | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.committed, self.in_output = signum, committed, in_output

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum

    def line(self) -> str:
        """The one line the CLI prints for it."""
        kept = "" if self.in_output is None else f" ({self.in_output} ok in the output)"
        return (f"interrupted ({signal.Signals(self.signum).name}): {self.committed} rows committed this run{kept}; "
                "re-run the same command to resume")
