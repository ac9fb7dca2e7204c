"""What a scores table's `_SUCCESS` keeps of each run that wrote to it: its counts, and per metric the definition,
weights and provenance its replicas reported, with the library versions and the config."""

from __future__ import annotations

from datetime import datetime, timezone

from kandinsky_batch.config.load import to_dict
from kandinsky_batch.config.schema import JobConfig
from kandinsky_batch.output.success import versions
from pipelines.scoring.registry import metric


def provenance(workers: list[dict], metrics: list[str]) -> dict:
    """Each metric's definition, weights and the provenance its replicas reported (None: no replica loaded it)."""
    reported = {}
    for info in workers:
        reported.update({k: v for k, v in (info.get("provenance") or {}).items() if v is not None})
    return {name: {"definition": metric(name).definition, "device": metric(name).device,
                   "weights": metric(name).weights, "provenance": reported.get(name)} for name in metrics}


def run_summary(run_id: str, result, metrics: list[str], cfg: JobConfig, **where) -> dict:
    """One run's entry in the scores table's `_SUCCESS`."""
    counts = {k: getattr(result, k) for k in ("rows", "scored", "errors", "already", "skipped", "seconds")
              if hasattr(result, k)}
    return {"run_id": run_id, "finished_at": datetime.now(timezone.utc).isoformat(), **where, "counts": counts,
            "metrics": provenance(result.workers, metrics), "weights": dict(cfg.score.weights),
            "versions": versions(), "config": to_dict(cfg)}
