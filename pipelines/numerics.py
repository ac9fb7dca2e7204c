"""CPU numerics: one code path on every x86 CPU of the fleet, so a CPU replica renders the same bits anywhere.

BLAS kernels, and so the last bit of a float, depend on the CPU: on an Intel Xeon with AVX-512, MKL and torch
pick AVX-512 kernels that round differently from the AVX2 ones an AMD EPYC without AVX-512 runs. Pinning
MKL's conditional-numerical-reproducibility branch, torch's own vectorised kernels and oneDNN's instruction
set to AVX2 makes every machine of this kind run the same code. These are read when a process loads the
libraries, so they must be in the environment before torch is imported: CPU replicas get them from the
system layer; `tests/conftest.py` sets them for the in-process oracle. GPU replicas do not need them.
"""

import os

CPU_NUMERICS_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# `native` leaves the host's own kernels (and any MKL_CBWR etc. already set): to test on another code path.
SWITCH = "KANDINSKY_BATCH_CPU_NUMERICS"


def cpu_numerics_env() -> dict[str, str]:
    """The variables a CPU replica starts with: the pinned AVX2 path, or none when SWITCH is `native`."""
    return {} if os.environ.get(SWITCH) == "native" else dict(CPU_NUMERICS_ENV)
