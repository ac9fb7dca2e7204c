"""Input rows -> render tasks: effective parameters, seeds, and per-row validation.

A row the model cannot render exactly as asked becomes `invalid` with an error naming the field,
the value and the rule; the other rows still render. Nothing is adjusted silently.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import asdict, dataclass

import pyarrow as pa

from kandinsky_batch.config import MAX_SEED, JobConfig
from kandinsky_batch.storage import object_key
from pipelines import ModelSpec, RenderRequest

MAX_ID_CHARS = 256
MAX_STEPS = 1000
PARAMS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
# Unicode categories an id may not contain: controls, format (zero-width, bidi), surrogates, private use,
# and line/paragraph separators (they split log lines).
_BAD_ID_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")


def derive_seed(job_seed: int, row_id: str) -> int:
    """A row's seed from the job seed and its id alone (never its position or batch), in [0, 2**63)."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Task:
    """One valid row with every parameter resolved to the value that will be rendered."""

    id: str
    row_index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    overwrite: bool = False
    """Replace an object already under this row's key (a forced re-render, a truncated orphan)."""
    text_tokens: tuple = (0, 0)
    """Tokens of the prompt and the effective negative prompt: rows batch together only when equal."""

    def request(self) -> RenderRequest:
        fields = self.row()
        del fields["id"], fields["row_index"]
        return RenderRequest(**fields)

    def row(self) -> dict:
        """The task's manifest fields: its id, position and effective parameters."""
        fields = asdict(self)
        del fields["overwrite"], fields["text_tokens"]
        return fields

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one batched forward. The transformer has no text attention
        mask, so prompts of different token lengths would attend to padding: lengths are in the key."""
        return (self.height, self.width, self.num_frames, self.num_inference_steps, self.guidance_scale,
                self.text_tokens)

    def tokens(self) -> int:
        """Visual tokens the transformer sees: latent frames x (height/16) x (width/16)."""
        return ((self.num_frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16)

    def cost(self) -> float:
        """Relative GPU cost: visual tokens x steps x transformer passes per step."""
        return self.tokens() * self.num_inference_steps * (2 if self.guidance_scale > 1.0 else 1)


def _id_error(row_id: str | None) -> str | None:
    if row_id is None:
        return "id=None: missing (rule: ids must be non-empty; drop the column to use row positions)"
    if not row_id.strip():
        return f"id={row_id!r}: empty or blank (rule: ids must be non-empty)"
    if len(row_id) > MAX_ID_CHARS:
        return f"id={row_id[:40]!r}...: {len(row_id)} characters (rule: at most {MAX_ID_CHARS})"
    bad = next((c for c in row_id if unicodedata.category(c) in _BAD_ID_CATEGORIES), None)
    if bad is not None:
        return f"id={row_id!r}: contains control character U+{ord(bad):04X} (rule: printable characters only)"
    path = row_id.replace("\\", "/")
    if path.startswith("/") or any(part in (".", "..") for part in path.split("/")):
        return f"id={row_id!r}: would escape the output prefix (rule: no leading '/', no '.' or '..' segments)"
    return None


def _is_blank(text: str) -> bool:
    # Whitespace, controls and zero-width characters only: the text encoder would see nothing.
    return not any(not (c.isspace() or unicodedata.category(c)[0] in "CZ") for c in text)


def _text_error(field: str, text, spec: ModelSpec, required: bool, count_tokens) -> str | None:
    if text is None:
        return f"{field}=None: missing (rule: required)" if required else None
    if _is_blank(text):
        return f"{field}={text[:40]!r}: empty or blank (rule: must contain text)"
    tokens = count_tokens(text)
    if tokens > spec.max_prompt_tokens:
        return (f"{field}={text[:40]!r}...: {tokens} tokens (rule: the text encoder keeps at most "
                f"{spec.max_prompt_tokens}; longer prompts would be truncated)")
    return None


def _param_error(task: dict, spec: ModelSpec) -> str | None:
    for key in ("height", "width"):
        value = task[key]
        if value <= 0 or value % spec.spatial_multiple or value > spec.max_size:
            return (f"{key}={value}: must be a positive multiple of {spec.spatial_multiple} "
                    f"and at most {spec.max_size} for this model")
    frames = task["num_frames"]
    if frames < 1 or (frames - 1) % spec.temporal_multiple or frames > spec.max_frames:
        return (f"num_frames={frames}: must be {spec.temporal_multiple}k+1 and at most {spec.max_frames} "
                f"(e.g. 121 for 5 s, 241 for 10 s)")
    steps = task["num_inference_steps"]
    if not 1 <= steps <= MAX_STEPS:
        return f"num_inference_steps={steps}: must be in [1, {MAX_STEPS}]"
    guidance = task["guidance_scale"]
    if not (math.isfinite(guidance) and guidance >= 0):
        return f"guidance_scale={guidance}: must be a finite number >= 0"
    seed = task["seed"]
    if not 0 <= seed <= MAX_SEED:
        return f"seed={seed}: must be in [0, {MAX_SEED}]"
    return None


def _fit_columns(values: dict) -> dict:
    """Blank out numbers an invalid row gave that the manifest's int32/int64 columns cannot hold."""
    limits = {"seed": MAX_SEED, **{key: 2**31 - 1 for key in PARAMS if key != "guidance_scale"}}
    return {k: (None if k in limits and v is not None and not -limits[k] <= v <= limits[k] else v)
            for k, v in values.items()}


def build_tasks(table: pa.Table, cfg: JobConfig, spec: ModelSpec) -> tuple[list[Task], list[dict]]:
    """Resolve every row: valid rows become Tasks, the rest manifest rows with status `invalid`."""
    defaults = cfg.render
    rows = table.to_pylist()
    tasks: list[Task] = []
    invalid: list[dict] = []
    first_seen: dict[str, int] = {}
    key_owner: dict[str, tuple[str, int]] = {}
    token_counts: dict[str, int] = {}

    def count_tokens(text: str) -> int:
        # The default negative prompt repeats on every row: tokenize each distinct text once.
        if text not in token_counts:
            token_counts[text] = spec.prompt_tokens(text)
        return token_counts[text]

    for index, row in enumerate(rows):
        raw_id = row.get("id")
        missing_id = "id" in row and raw_id is None
        # The manifest's id column is non-null: a null id is recorded as "" (and the row as invalid).
        row_id = str(index) if "id" not in row else ("" if raw_id is None else str(raw_id))
        params = {key: row.get(key) if row.get(key) is not None else getattr(defaults, key) for key in PARAMS}
        params["guidance_scale"] = float(params["guidance_scale"])
        negative = row.get("negative_prompt")
        negative = defaults.negative_prompt if negative is None else negative
        seed = row.get("seed")
        candidate = dict(
            id=row_id, row_index=index, prompt=row.get("prompt"),
            seed=derive_seed(defaults.seed, row_id) if seed is None else int(seed), **params,
        )
        candidate["negative_prompt"] = RenderRequest(
            prompt="", negative_prompt=negative, seed=0, **params
        ).effective_negative_prompt()

        error = _id_error(None if missing_id else row_id)
        if error is None and row_id in first_seen:
            error = f"id={row_id!r}: duplicate of row {first_seen[row_id]} (rule: ids must be unique)"
        first_seen.setdefault(row_id, index)
        if error is None:
            # Distinct ids must never share an object (a crafted id can equal another id's hashed key).
            key = object_key(row_id, cfg.output.format)
            owner = key_owner.setdefault(key, (row_id, index))
            if owner[1] != index:
                error = (f"id={row_id!r}: maps to object key {key!r} like the id {owner[0]!r} of row {owner[1]} "
                         f"(rule: ids must map to distinct objects)")
        error = (error or _text_error("prompt", candidate["prompt"], spec, True, count_tokens)
                 or _param_error(candidate, spec))
        if error is None and candidate["negative_prompt"] is not None:
            error = _text_error("negative_prompt", candidate["negative_prompt"], spec, False, count_tokens)
        if error is None:
            negative = candidate["negative_prompt"]
            tokens = (count_tokens(candidate["prompt"]), count_tokens(negative) if negative is not None else 0)
            tasks.append(Task(**candidate, text_tokens=tokens))
        else:
            invalid.append({**_fit_columns(candidate), "status": "invalid", "error": error, "attempts": 0})
    return tasks, invalid
