"""`kandinsky-batch run | validate | score | export | status | verify | report | reproduce | build-tiny`;
`python -m kandinsky_batch` is the same program."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from importlib import metadata

# 0: done; 1: `verify` found problems, or `reproduce` a re-render unlike its object; 2: bad config or input,
# refused before Ray; 3: stopped early, progress kept;
# 4: finished (`_SUCCESS` written), but nothing rendered ok, or more rows invalid than `--max-invalid` allows.
EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_NOTHING_OK = 0, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky-batch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kandinsky-batch {metadata.version('kandinsky-batch')}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="render a Parquet prompt dataset to videos + a manifest")
    run.add_argument("config", help="YAML job config (see configs/)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output.uri=./outputs/x")
    run.add_argument("--force", action="store_true",
                     help="re-render rows the output prefix holds with other parameters")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--dry-run", action="store_true", help="only validate: the same as `validate` (nothing starts)")
    run.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
    check = verbs.add_parser("validate", help="check every row as `run` would, without Ray or weights, writing "
                             "nothing; count what run would do and estimate its GPU-hours")
    check.add_argument("config", help="YAML job config (see configs/)")
    check.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. input.limit=100")
    check.add_argument("--force", action="store_true", help="as `run --force`: rows rendered with other parameters "
                       "would be re-rendered (not refused)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    score = verbs.add_parser("score", help="score a finished job's videos (or a Parquet of videos) into a scores table")
    score.add_argument("source", help="a finished job's output.uri, or a Parquet dataset with a `video` column")
    score.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. cluster.replicas=8")
    score.add_argument("--out", help="the scores table (default: SOURCE/scores for a job output)")
    score.add_argument("--metrics", help="comma-separated metric names (default: every metric needing no weights)")
    score.add_argument("--storage-options", default=None, help="fsspec options as JSON (source, videos, --out)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    export = verbs.add_parser("export", help="write a finished job's ok rows, filtered by their scores, as a "
                              "training set (webdataset, videofolder, csv or vbench)")
    export.add_argument("source", help="a finished job's output.uri")
    export.add_argument("--format", required=True, help="webdataset | videofolder | csv | vbench")
    export.add_argument("--to", required=True, help="the destination prefix (local or an object store)")
    export.add_argument("--where", help="a SQL condition over manifest and score columns (DuckDB), e.g. "
                        "\"clip_score > 25 AND shot_cuts = 0\"; status = 'ok' always applies")
    export.add_argument("--split", help="held-out splits by a hash of the id, e.g. val=0.02 (the rest: train)")
    export.add_argument("--caption", default="prompt", help="the text of each sample: prompt | expanded_prompt")
    export.add_argument("--shard-size", type=int, help="samples per shard (per unit of file-by-file formats: 256)")
    export.add_argument("--shard-bytes", type=int, help="bytes of video per shard (default 1 GB if no --shard-size)")
    export.add_argument("--dry-run", action="store_true", help="print what would be exported; write nothing")
    export.add_argument("--address", help="Ray address to join (default: a local Ray on loopback; `inprocess`: "
                        "threads of this process)")
    export.add_argument("--storage-options", default="{}", help="fsspec options as JSON (source and --to)")
    status = verbs.add_parser("status", help="rows ok / invalid / failed so far, and whether a job is running there")
    status.add_argument("output_uri")
    status.add_argument("--storage-options", default="{}", help="fsspec options as JSON")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    run.add_argument("--verbose", action="store_true",
                     help="also show Ray's start-up logs and the model libraries' progress bars")
    run.add_argument("--max-invalid", type=float, default=None, metavar="F",
                     help="exit 4 when more than this fraction of rows (in [0, 1]) is invalid; the job still "
                          "finishes and writes _SUCCESS")
    verify = verbs.add_parser("verify", help="check every ok row's object exists whole with its checksum")
    verify.add_argument("output_uri")
    verify.add_argument("--storage-options", default="{}", help="fsspec options as JSON")
    report = verbs.add_parser("report", help="write a static HTML page comparing the output's videos and timings")
    report.add_argument("output_uri")
    report.add_argument("--out", help="directory for index.html and its assets "
                        "(default: {OUTPUT_URI}/report on local disk, ./report for object stores)")
    report.add_argument("--columns", help="sweep axes across the grid's columns, comma-separated "
                        "(default: every axis but seed); the other axes split rows")
    report.add_argument("--expires", type=int, default=7 * 24 * 3600,
                        help="lifetime of presigned video URLs on object stores, seconds (default: 7 days)")
    report.add_argument("--copy-videos", action="store_true", help="copy the videos next to the page instead of linking")
    report.add_argument("--metric", help="with scores: the metric the grid opens on, colours and marks the best "
                        "variant by (default: clip_score, else the first metric with a direction)")
    report.add_argument("--storage-options", default="{}", help="fsspec options as JSON")
    again = verbs.add_parser("reproduce", help="re-render one committed row in-process with plain diffusers and "
                             "compare it with its object (exit 0 equal, 1 not)")
    again.add_argument("output_uri")
    again.add_argument("id", help="the row's id")
    again.add_argument("--storage-options", default="{}", help="fsspec options as JSON (the output's, and its "
                       "rows' image or source URIs')")
    tiny = verbs.add_parser("build-tiny", help="write the tiny random-weight pipeline in diffusers format")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0, help="another draw of the transformer's weights (`tiny:SEED`)")
    from pipelines.kinds import BY_NAME  # torch-free: the registry alone

    tiny.add_argument("--kind", default="t2v", choices=[name for name, kind in BY_NAME.items() if kind.preset],
                      help="which member of the family: text-to-video (`tiny`), image-to-video (`tiny-i2v`), "
                           "text-to-image (`tiny-t2i`), image-to-image (`tiny-i2i`) Kandinsky 6 video with sound (`tiny-k6`) or Kandinsky 6 super-resolution (`tiny-sr`)")
    return parser


def _run(args) -> int:
    if args.dry_run:
        return _validate(args)
    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.errors import ConfigError
    from kandinsky_batch.job import run

    if args.max_invalid is not None and not 0 <= args.max_invalid <= 1:
        raise ConfigError(f"--max-invalid={args.max_invalid:g}: must be a fraction in [0, 1]")
    cfg = load_config(args.config, args.overrides)
    if cfg.score.source is not None:
        return _scored(cfg, not args.no_progress, args.verbose)
    result = run(cfg, force=args.force, progress=not args.no_progress, verbose=args.verbose)
    print(f"done: {result.rows} rows: {result.ok} ok, {result.invalid} invalid, {result.failed} failed "
          f"({result.rendered} rendered, {result.skipped} already done, {result.adopted} adopted, "
          f"{result.retries} retries) in {result.seconds:.1f} s -> {cfg.output.uri}"
          + (f"; it also keeps {result.kept} rows of ids this input does not hold" if result.kept else "")
          + (f"; {result.drains} replicas retired by node drains ({result.drained} rows handed back, no attempt "
             f"counted)" if result.drains else ""))
    why = (f"; most common reason ({result.top_count} of {result.rows} rows): {result.top_reason}"
           if result.top_reason else "")
    if result.rows and not result.ok:
        print(f"error: finished, but none of {result.rows} rows rendered ok{why}", file=sys.stderr)
        return EXIT_NOTHING_OK
    if args.max_invalid is not None and result.rows and result.invalid / result.rows > args.max_invalid:
        print(f"error: {result.invalid} of {result.rows} rows invalid ({result.invalid / result.rows:.1%}), more "
              f"than --max-invalid={args.max_invalid:g}; the job finished and wrote _SUCCESS, nothing done is "
              f"lost{why}", file=sys.stderr)
        return EXIT_NOTHING_OK
    return EXIT_OK


def _score(args) -> int:
    from kandinsky_batch.config.load import load_config

    given = [f"score.source={args.source}"]
    if args.out:
        given.append(f"score.out={args.out}")
    if args.metrics is not None:
        given.append(f"score.metrics=[{','.join(m.strip() for m in args.metrics.split(',') if m.strip())}]")
    if args.storage_options:
        given.append(f"score.storage_options={args.storage_options}")
    return _scored(load_config(None, [*given, *args.overrides]), not args.no_progress, False)


def _scored(cfg, progress: bool, verbose: bool) -> int:
    """A scoring job (`score`, or `run` of a config with `score.source`) and its `done:` line."""
    from kandinsky_batch.score import run

    result = run(cfg, progress=progress, verbose=verbose)
    skipped = ", ".join(f"{n} {status}" for status, n in sorted(result.skipped.items()))
    print(f"done: {result.rows} rows: {result.scored} scored, {result.errors} with errors, {result.already} "
          f"already scored, {sum(result.skipped.values())} skipped{f' ({skipped})' if skipped else ''} in "
          f"{result.seconds:.1f} s ({', '.join(result.metrics)}) -> {result.out}")
    return EXIT_OK


def _validate(args) -> int:
    from kandinsky_batch.config.load import load_config
    from kandinsky_batch.validate import format_validation, validate

    cfg = load_config(args.config, args.overrides)
    if cfg.score.source is not None:  # a scoring job: its source and table read, nothing started
        from dataclasses import asdict

        from kandinsky_batch import score

        planned = score.plan(cfg)
        print(json.dumps(asdict(planned), indent=2) if args.json else planned.lines())
        return EXIT_OK
    found = validate(cfg, force=args.force)
    print(json.dumps(found.to_dict(), indent=2) if args.json else format_validation(found))
    return EXIT_OK


def _export(args) -> int:
    from kandinsky_batch.export.stage import ExportArgs, format_result, parse_split, run

    given = ExportArgs(args.source, args.to, args.format, where=args.where, split=parse_split(args.split),
                       caption=args.caption, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                       storage_options=json.loads(args.storage_options), address=args.address)
    print(format_result(run(given, dry_run=args.dry_run), given))
    return EXIT_OK


def _status(args) -> int:
    from kandinsky_batch.output.status import format_status, status

    found = status(args.output_uri, json.loads(args.storage_options))
    print(json.dumps(found.__dict__, indent=2) if args.json else format_status(found))
    return EXIT_OK


def _verify(args) -> int:
    from kandinsky_batch.output.verify import verify

    problems = verify(args.output_uri, json.loads(args.storage_options))
    for problem in problems:
        print(problem)
    print("verify: ok" if not problems else f"verify: {len(problems)} problem(s)")
    return EXIT_OK if not problems else 1


def _report(args) -> int:
    from kandinsky_batch.output.report import write_report

    columns = None if args.columns is None else [a.strip() for a in args.columns.split(",") if a.strip()]
    index = write_report(args.output_uri, args.out, storage_options=json.loads(args.storage_options),
                         columns=columns, expires=args.expires, copy_videos=args.copy_videos, metric=args.metric)
    print(f"report: {index}")
    return EXIT_OK


def _reproduce(args) -> int:
    from kandinsky_batch.reproduce import format_comparison, reproduce

    options = json.loads(args.storage_options)
    found = reproduce(args.output_uri, args.id, options, options)
    print(format_comparison(found))
    return EXIT_OK if found.equal else 1


def _build_tiny(args) -> int:
    from pipelines import save_tiny
    from pipelines.kinds import BY_NAME

    kind = BY_NAME[args.kind]
    written = save_tiny(args.dir, args.seed, kind.builder)
    print(f"tiny {kind.pipeline} (random weights; model.path={kind.preset}) written to {written}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags (`run cfg.yaml --force a=1 b=2`): argparse stops
    # collecting positionals at the first flag, so gather the rest here.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or args.verb not in ("run", "validate", "score")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.verb in ("run", "validate", "score"):
        args.overrides = list(args.overrides) + extra
    if args.verb == "reproduce":  # the replicas' CPU numerics are read when torch loads: before any import of it
        from kandinsky_batch.reproduce import prepare_process

        prepare_process(sys.argv[1:] if argv is None else argv)
    from kandinsky_batch.errors import (ConfigError, InputError, Interrupted, LeaseHeld, LeaseLost, ReportError,
                                        ReproduceError, ResumeConflict, StorageOutage, StorageUnavailable, VerifyError,
                                        WorkersFailed)
    from pipelines.kinds import UnsupportedModel
    from pipelines.resolve import ModelNotFound

    try:
        return {"run": _run, "validate": _validate, "score": _score, "export": _export, "status": _status,
                "verify": _verify, "report": _report, "reproduce": _reproduce, "build-tiny": _build_tiny}[args.verb](args)
    except (ConfigError, InputError, ReportError, ResumeConflict, VerifyError, ReproduceError, ModelNotFound,
            UnsupportedModel, LeaseHeld) as exc:
        # Bad input is the user's to fix: one line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageOutage, StorageUnavailable, WorkersFailed, LeaseLost) as exc:
        print(f"error: {exc}; progress is kept, re-run the same command to continue", file=sys.stderr)
        return EXIT_INCOMPLETE
    except Interrupted as exc:
        # SIGINT/SIGTERM (interrupt.py): what was committed is published; one line, 128 + the signal.
        print(exc.line(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Ctrl-C outside `run`'s own handling (loading the config and libraries, the other verbs): no traceback.
        print("interrupted (SIGINT)" + (" before the job started: nothing written" if args.verb == "run" else ""),
              file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
