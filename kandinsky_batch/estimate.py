"""GPU-hours of the rows a job would render: the cost model (`Task.cost`: visual tokens x steps x passes)
calibrated by the seconds measured on an H200 (benchmarks/RESULTS.md section 3).

Only what was measured is calibrated: the Kandinsky 5 Lite DiT (2 B, 28 heads of 64) per attention backend and
compile option (3.2), and the Pro DiT (19 B, 32 heads of 128) eager (3.3), each at 5 s 768x512 (47,616 visual
tokens). A row's seconds are its transformer passes at the measured seconds per token-step-pass, plus the VAE
decode at the measured 6.29 s per 47,616 tokens, both linear in tokens. Kandinsky 6, the image kinds and SR have
no measurement: they are "not calibrated". The tiny presets cost ~nothing; `simulated` sleeps its own rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kandinsky_batch.intake.rows import Task
from pipelines import ModelSpec
from pipelines.kinds import BY_NAME
from pipelines.request import RenderOptions

GPU = "NVIDIA H200"
REFERENCE_TOKENS = 47_616
"""5 s (121 frames) at 768x512: the clip every figure below was measured at."""
DECODE_SECONDS = 6.29
"""Framewise VAE decode of the reference clip (RESULTS 3.2)."""
# Seconds per guided step (two DiT passes) of the reference clip, RESULTS 3.2 (results/gpu_step.json).
LITE_STEP_SECONDS = {
    "native": 3.517,
    "_native_cudnn": 3.587,
    "_native_flash": 4.630,
    "native+batched": 3.525,
    "native+compile+batched": 2.772,
}
PRO_STEP_SECONDS = 15.66
"""Pro-size DiT, one guided step, eager (RESULTS 3.3, results/gpu_memory.json)."""
LINEARITY = ("linear in tokens: attention grows faster, a 10 s clip measured 11.12 s per guided step eager, "
             "1.6x the 6.92 s this gives (RESULTS 3.2)")
LITE_HEADS, PRO_HEADS = 28, 32


@dataclass
class Calibration:
    """Seconds per row of one model with its options, and what they rest on."""

    basis: str
    """What the figure is: the GPU, the model size and the measurement, or why there is none."""
    pass_seconds: float | None
    """Seconds per visual token, step and DiT pass (None: not calibrated)."""
    decode_seconds: float = 0.0
    """Seconds per visual token of the VAE decode."""
    notes: list[str] = field(default_factory=list)

    def seconds(self, task: Task) -> float | None:
        if self.pass_seconds is None:
            return None
        return self.pass_seconds * task.cost() + self.decode_seconds * task.tokens()


def _lite_config(options: RenderOptions, notes: list[str]) -> str:
    """Which measured Lite configuration `options` run as."""
    backend = options.attention_backend or "native"
    if options.compile:
        if backend != "native":
            notes.append(f"attention_backend={backend} with compile not measured: native+compile+batched used")
        elif not options.batched_guidance:
            notes.append("compile without batched_guidance not measured: native+compile+batched used "
                         "(batched guidance alone changes nothing: 3.525 vs 3.517 s a step)")
        return "native+compile+batched"
    if backend == "native":
        return "native+batched" if options.batched_guidance else "native"
    if backend in LITE_STEP_SECONDS:
        return backend
    notes.append(f"attention_backend={backend} not measured: the eager native figure used")
    return "native"


def calibrate(spec: ModelSpec, options: RenderOptions) -> Calibration:
    """The seconds model for one model of a job (its checkpoint's size and kind, the options it runs with)."""
    path = spec.path
    if path.startswith("simulated"):
        from pipelines.simulated import seconds_per_megaunit

        rate = seconds_per_megaunit(path)
        return Calibration(f"simulated model: sleeps {rate} s per million cost units (no GPU)", rate / 1e6)
    if path.split(":")[0].startswith("tiny"):
        return Calibration(f"{path}: a tiny random-weight preset, its renders cost ~nothing", 0.0)
    kind = BY_NAME[spec.kind]
    measured = kind.generation == 5 and kind.frames  # the Kandinsky 5 video DiTs (I2V shares T2V's sizes)
    if not measured or spec.num_heads not in (LITE_HEADS, PRO_HEADS):
        # RESULTS 3.5 is the Kandinsky 6 (sound) measurement.
        what = f"a {spec.kind} DiT of {spec.num_heads} heads" if measured else (
            kind.title + (" (RESULTS 3.5 not run yet)" if kind.sound else ""))
        return Calibration(f"not calibrated: no measurement of {what}", None)
    notes = [LINEARITY]
    if options.approximate:
        notes.append("step caches and NABLA skip work: an upper bound")
    if options.offload_text_encoder:
        notes.append("offload_text_encoder's per-prompt cost not measured")
    if spec.num_heads == PRO_HEADS:
        if options.compile or options.batched_guidance or options.attention_backend not in (None, "native"):
            notes.append("Pro measured eager native only: that figure used")
        step, basis = PRO_STEP_SECONDS, f"{GPU}, Kandinsky 5 Pro DiT (19 B), eager, {PRO_STEP_SECONDS} s a step"
    else:
        config = _lite_config(options, notes)
        step = LITE_STEP_SECONDS[config]
        basis = f"{GPU}, Kandinsky 5 Lite DiT (2 B), {config}, {step} s a step"
    basis += f" at 5 s 768x512 + {DECODE_SECONDS} s decode (RESULTS 3.2-3.3)"
    return Calibration(basis, step / (2 * REFERENCE_TOKENS), DECODE_SECONDS / REFERENCE_TOKENS, notes)
