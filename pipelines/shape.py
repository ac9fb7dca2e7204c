"""A gang's shape (torch-free, so the system layer can validate and name it cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


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

    def problems(self, num_heads: int, attention_type: str = "regular") -> list[str]:
        """Why this shape cannot run a model with `num_heads` heads and this attention (empty if it can)."""
        found = []
        if self.sequence > 1 and attention_type == "nabla":
            # NABLA builds its block-sparse mask from q and k inside the attention processor, before
            # diffusers' all-to-all: on a sequence shard that mask would be wrong, not just slower.
            found.append(f"sequence_parallel={self.sequence}: this model uses NABLA sparse attention, which "
                         "diffusers cannot split by sequence yet; use cfg_parallel or more replicas")
        if self.ulysses < 1 or self.ring < 1:
            found.append(f"sequence_parallel={self.sequence}: degrees must be >= 1")
        if self.ulysses > 1 and num_heads % self.ulysses:
            divisors = [d for d in range(2, num_heads + 1) if num_heads % d == 0]
            found.append(f"sequence_parallel={self.ulysses}: Ulysses splits the {num_heads} attention heads, "
                         f"so the degree must divide {num_heads} (one of {divisors[:8]})")
        return found
