"""``python -m benchmarks [--quick] [--only NAME,...] [--repeat N] [--output DIR]
[--db-latency MS,...]``.

Runs the chosen sections in one run on this machine, prints the Markdown table, and writes
``latest.md`` and ``latest.png`` into ``benchmarks/results/`` (or ``--output``). Exits 1 if a
section could not be measured (a missed speed target is reported, never an error).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

from benchmarks._env import Env, Options
from benchmarks._report import environment_lines, markdown, write_chart
from benchmarks._rows import Row

SECTIONS = ("hit", "propagation", "throughput", "fanout", "workload", "memory", "topology")
RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="nearcache against its peers, measured side by side in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="a < 60 s smoke run")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="repetitions per section (default: per section)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"where to write latest.md/.png ({RESULTS} for a full run; "
        f"{RESULTS / 'partial'} for --quick or --only, so they never replace the full results)",
    )
    parser.add_argument(
        "--db-latency",
        default="0,1",
        help="workload: milliseconds added to every load from the source of truth, one run "
        "of every contender per value (default: 0,1)",
    )
    args = parser.parse_args(argv)
    try:
        args.db_latencies = tuple(float(v) for v in args.db_latency.split(",") if v.strip())
    except ValueError:
        parser.error(
            f"--db-latency takes milliseconds separated by commas, got {args.db_latency!r}"
        )
    if not args.db_latencies or any(not 0 <= v <= 1000 for v in args.db_latencies):
        parser.error("--db-latency values must be between 0 and 1000 ms")
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.output is None:
        partial = args.quick or set(args.sections) != set(SECTIONS)
        args.output = RESULTS / "partial" if partial else RESULTS
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: servers and workers stop


def main(argv: list[str] | None = None) -> int:
    """Run the harness; return the process exit code."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    options = Options(quick=args.quick, repeat=args.repeat, db_latencies=args.db_latencies)
    env = Env(options)
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    try:
        for name in args.sections:
            module = importlib.import_module(f"benchmarks.{name}")
            section_started = time.monotonic()
            try:
                rows.extend(module.run(options, env))
            except Exception as exc:
                failed.append(name)
                env.notes.append(f"{name}: FAILED ({type(exc).__name__}: {exc})".splitlines()[0])
                traceback.print_exc(file=sys.stderr)
            env.log(f"{name}: done in {time.monotonic() - section_started:.0f}s")
        servers = []
        if env._redis is not None:
            servers.append(f"redis-server {env._redis.version} (loopback, started by the harness)")
        if env._csc_note:
            servers.append(f"client-side caching server: {env._csc_note}")
    finally:
        env.close()
    elapsed = time.monotonic() - started
    table = markdown(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    chart_note = write_chart(rows, args.output / "latest.png")
    if chart_note:
        env.notes.append(chart_note)
    mode = "quick" if args.quick else "full"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join(
        [
            "# nearcache benchmarks",
            "",
            f"`python -m benchmarks {' '.join(sys.argv[1:] if argv is None else argv)}`"
            f" - {mode} run, {stamp}, {elapsed:.0f}s, sections: {', '.join(args.sections)}",
            "",
            *environment_lines(servers),
            "",
            "Medians over repetitions; ratios are taken per repetition between contenders "
            "measured side by side, then summarized the same way. Targets are reported, "
            "never asserted.",
            "",
            table,
            "",
            *(["## Notes", "", *(f"- {n}" for n in env.notes), ""] if env.notes else []),
        ]
    )
    (args.output / "latest.md").write_text(report)
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
