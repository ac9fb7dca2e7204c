"""Keeping the model libraries' progress bars (hub downloads, "Writing model shards", "Loading checkpoint shards")
off a job's console: the job's own progress bar is the one line that should move there."""

from __future__ import annotations

import os
import sys

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
"""Environment of a process that should start with the hub's and transformers' bars off (they read it on import)."""


def quiet_progress() -> None:
    """Turn the hub's, transformers' and diffusers' progress bars off in this process, imported yet or not."""
    os.environ.update(QUIET_ENV)
    # A library imported before the variable was set has read it already: switch its bars off by hand.
    # Diffusers never reads it, so it is switched off whenever it is loaded (`pipelines.render`) too.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
