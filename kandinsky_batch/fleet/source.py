"""Where the work queue's rows come from: windows of tasks as they become ready (`intake.windows.Intake`)."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from kandinsky_batch.intake.rows import Task


class Source(Protocol):
    """Rows as they become ready (validated, routed, longest first within a window)."""

    def poll(self) -> list[dict[str, list[Task]]]: ...  # windows ready now, pool name -> tasks (may be [])
    @property
    def exhausted(self) -> bool: ...                      # no window will come any more


class WindowList:
    """A `Source` of windows known up front, one per poll (the work queue's tests and simulations)."""

    def __init__(self, windows: list[dict[str, list[Task]]]):
        self.windows = deque(windows)

    def poll(self) -> list[dict[str, list[Task]]]:
        return [self.windows.popleft()] if self.windows else []

    @property
    def exhausted(self) -> bool:
        return not self.windows
