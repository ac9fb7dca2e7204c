"""A gang's shape (torch-free, so the system layer can validate and name it cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


# What a sequence-parallel gang's frames promise against one device's on any x86 CPU in fp32: at most this
# many uint8 levels apart, on at most this fraction of values. A shard runs GEMMs over fewer rows than the
# whole sequence, and a CPU's BLAS may round those differently: seen on an Intel Xeon, 1 level on up to
# 0.17 % of a 32x32 clip's values (native AVX-512 kernels), up to 0.008 % on the pinned AVX2 path.
# In bf16 (GPUs) no bound is promised: see docs/gangs.md.
SHARD_TOLERANCE = (1, 1e-2)


@dataclass(frozen=True)
class ParallelSpec:
    """A gang's shape: Ulysses degree x ring degree ranks per branch, x2 with CFG parallel."""

    ulysses: int = 1
    ring: int = 1
    cfg: bool = False

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring

    @property
    def bit_identical(self) -> bool:
        """Whether frames equal one device's bit for bit on any CPU or GPU: CFG parallel alone runs the same
        GEMMs on the same rows; a sequence shard does not (`SHARD_TOLERANCE`)."""
        return self.sequence == 1

    @property
    def world_size(self) -> int:
        return self.sequence * (2 if self.cfg else 1)

    @property
    def name(self) -> str:
        """`1`, `sp2`, `cfg2`, `sp2xcfg2`, `sp4(ring2)`... as recorded in the manifest's `gang` column."""
        parts = []
        if self.sequence > 1:
            parts.append(f"sp{self.sequence}" + (f"(ring{self.ring})" if self.ring > 1 else ""))
        if self.cfg:
            parts.append("cfg2")
        return "x".join(parts) or "1"

    def problems(self, num_heads: int, attention_type: str = "regular", cache: str | None = None) -> list[str]:
        """Why this shape cannot run a model with `num_heads` heads, this attention and step cache (empty if it can)."""
        found = []
        if self.ring > 1 and attention_type == "nabla":
            # Ring attention passes key/value blocks around and merges partial softmaxes; NABLA's block
            # mask needs flex attention over the whole key sequence. Ulysses (all-to-all) works.
            found.append(f"ring_degree={self.ring}: NABLA sparse attention runs with Ulysses only; "
                         "set ring_degree to 1")
        if self.sequence > 1 and cache == "firstblock":
            # FirstBlockCache decides to skip from the first block's output; each rank sees only its
            # shard, so ranks could decide differently and deadlock in the next collective.
            found.append(f"sequence_parallel={self.sequence}: FirstBlockCache decides per rank from a sequence "
                         "shard; use magcache or taylorseer with sequence parallel")
        if self.ulysses < 1 or self.ring < 1:
            found.append(f"sequence_parallel={self.sequence}: degrees must be >= 1")
        if self.ulysses > 1 and num_heads % self.ulysses:
            divisors = [d for d in range(2, num_heads + 1) if num_heads % d == 0]
            found.append(f"sequence_parallel={self.ulysses}: Ulysses splits the {num_heads} attention heads, "
                         f"so the degree must divide {num_heads} (one of {divisors[:8]})")
        return found
