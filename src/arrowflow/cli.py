"""The ``arrowflow`` command (also ``python -m arrowflow``).

- ``arrowflow run MODULE:PIPELINE --input IN``: run a pipeline, a flow or an agent over a
  Parquet file (or a directory of them), scanned lazily into the field its first scope streams
  over; ``--output`` writes that field stream by stream, ``--state`` makes reruns resume.
- ``arrowflow demo``: the built-in prospect pipeline (``python -m arrowflow.demo``).
- ``arrowflow bench MODULE:PIPELINE --input IN --stream-sizes 1000,10000``: the same run at
  several stream sizes, measured.
- ``arrowflow stats STATE.duckdb``: what a state file holds, where a killed run stands.

Exit codes: 0 success, 1 the run failed, 2 a usage error, 130 interrupted (Ctrl-C). Errors are
one line on stderr; ``--traceback`` (or ``ARROWFLOW_TRACEBACK=1``) prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

import arrowflow as af
from arrowflow.flow import ENGINES

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from arrowflow.scope import BatchingScope
    from arrowflow.state.inspect import TableState

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CommandError", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_PROG = "arrowflow"
_T = TypeVar("_T")
# The part of BatchExecutionError's advice that speaks to code holding the exception.
_API_ADVICE = " Completed streams are in .partial_results"


class CommandError(Exception):
    """An error the command reports on one line, and the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``arrowflow`` command with ``argv`` (``sys.argv[1:]`` when ``None``).

    Returns:
        The exit code: 0 success, 1 the run failed, 2 a usage error, 130 interrupted.

    Example:
        >>> main(["stats", "missing.duckdb"])
        2
    """
    parser = _parser()
    traceback_wanted = os.environ.get("ARROWFLOW_TRACEBACK", "") not in ("", "0")
    try:
        args = parser.parse_args(argv)
        traceback_wanted = traceback_wanted or args.traceback
        command: Callable[[argparse.Namespace], int] = args.command
        return command(args)
    except CommandError as exc:
        if traceback_wanted:
            traceback.print_exception(exc.__cause__ or exc)
        kind = "interrupted" if exc.code == EXIT_INTERRUPTED else "error"
        print(f"{_PROG}: {kind}: {_one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt as exc:  # before or after a run: nothing of a run to keep
        if traceback_wanted:
            traceback.print_exception(exc)
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# -- the command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Report a mistake on one line, as a :class:`CommandError`, instead of usage and exit."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see '{self.prog} --help')")


def _parser() -> _Parser:
    parser = _Parser(
        prog=_PROG,
        description="Run arrowflow pipelines over Parquet files.",
        epilog="Exit codes: 0 success, 1 the run failed, 2 usage error, 130 interrupted.",
    )
    parser.add_argument("--traceback", action="store_true", help=_TRACEBACK_HELP)
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = _verb(verbs, "run", _run, "run a pipeline over a Parquet input")
    _add_target(run)
    run.add_argument("--output", metavar="OUT.parquet", help=_OUTPUT_HELP)
    run.add_argument("--state", type=Path, metavar="STATE.duckdb", help=_STATE_HELP)
    run.add_argument("--key", metavar="COLUMN", help="key column of the input, for --state")
    run.add_argument("--stream-size", type=_positive, metavar="N", help="rows per stream")
    run.add_argument(
        "--max-concurrency", type=_positive, metavar="N", help="streams running at once"
    )
    run.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="where the scopes' agents run: this process, or a Ray runtime (default: %(default)s)",
    )
    run.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="with --engine ray: the cluster to join (default: RAY_ADDRESS, else a local runtime)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: in a terminal, when tqdm is installed)",
    )

    demo = _verb(verbs, "demo", _demo, "run the built-in prospect pipeline over data/")
    demo.add_argument("--stream-size", type=_positive, metavar="N", help="rows per stream")
    demo.add_argument(
        "--fresh", action="store_true", help="remove the previous output and state first"
    )

    bench = _verb(verbs, "bench", _bench, "measure a pipeline at several stream sizes")
    _add_target(bench)
    bench.add_argument(
        "--stream-sizes",
        type=_sizes,
        required=True,
        metavar="N,N,...",
        help="stream sizes to measure, e.g. 1000,10000,100000",
    )
    bench.add_argument(
        "--repeat", type=_positive, default=3, metavar="N", help="timed rounds (%(default)s)"
    )
    bench.add_argument(
        "--warmup", type=_count, default=1, metavar="N", help="untimed rounds (%(default)s)"
    )
    bench.add_argument("--plot", type=Path, metavar="PNG", help="save a plot (needs matplotlib)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")

    stats = _verb(verbs, "stats", _stats, "show what a state file holds")
    stats.add_argument("state", type=Path, metavar="STATE.duckdb", help="a DuckDB state file")
    stats.add_argument("--table", metavar="NAME", help="only this result table")
    return parser


_TRACEBACK_HELP = "print the traceback of an error (also: ARROWFLOW_TRACEBACK=1)"
_OUTPUT_HELP = (
    "write the streamed field stream by stream: a Parquet file (a path or an s3://, gs://, "
    "abfs:// URI), or a DuckDB table as FILE.duckdb::TABLE"
)
_STATE_HELP = (
    "keep what is done in this DuckDB file, so that a rerun skips it (table: the store the "
    "scope declares, else the trigger agent's name in snake_case)"
)


def _verb(
    verbs: argparse._SubParsersAction[_Parser],
    name: str,
    command: Callable[[argparse.Namespace], int],
    summary: str,
) -> _Parser:
    parser = verbs.add_parser(name, help=summary, description=summary[0].upper() + summary[1:])
    # SUPPRESS: the verb's default must not hide a --traceback given before the verb.
    parser.add_argument(
        "--traceback", action="store_true", default=argparse.SUPPRESS, help=_TRACEBACK_HELP
    )
    parser.set_defaults(command=command)
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="MODULE:PIPELINE",
        help="a Pipeline subclass, a Flow or an agent: module:Name or path/to/file.py:Name",
    )
    parser.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="IN",
        help="a Parquet file or a directory of Parquet files",
    )
    parser.add_argument(
        "--field",
        metavar="NAME",
        help="the field the input goes in (default: the first scope's over=)",
    )


def _positive(text: str) -> int:
    number = _integer(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return number


def _count(text: str) -> int:
    number = _integer(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return number


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _sizes(text: str) -> list[int]:
    sizes = [_positive(part.strip()) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"must list stream sizes, e.g. 1000,10000; got {text!r}")
    return sizes


# -- MODULE:PIPELINE ----------------------------------------------------------------------------


def _load(target: str) -> Any:
    """The object ``MODULE:NAME`` or ``path/to/file.py:NAME`` names."""
    module_name, _, name = target.rpartition(":")
    if not module_name or not name:
        raise CommandError(
            f"expected MODULE:PIPELINE (e.g. pipelines:Prospects or pipelines.py:Prospects), "
            f"got {target!r}"
        )
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(Path(module_name))
    else:
        module = _import_module(module_name)
    found: Any = module
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CommandError(f"module '{module.__name__}' has no attribute '{name}'") from None
    if not (_is_pipeline(found) or isinstance(found, af.Flow) or _is_agent(found)):
        raise CommandError(
            f"{target} is {type(found).__name__} {found!r}, not a Pipeline subclass, a Flow "
            "or an agent"
        )
    return found


def _import_module(name: str) -> Any:
    # As `python -m` does: modules of the directory the command runs in are importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise CommandError(
                f"no module named '{exc.name}' (run from the directory that holds it, or give "
                "its path: path/to/file.py:Name)"
            ) from exc
        raise CommandError(f"cannot import '{name}': {_describe(exc)}") from exc
    except Exception as exc:
        raise CommandError(f"cannot import '{name}': {_describe(exc)}") from exc


def _send_by_value(target: str) -> None:
    """A pipeline given as a file is sent to Ray's workers with its agents (pickled by
    value): a cluster needs no copy of it. Modules it imports must be importable there."""
    module_name = target.rpartition(":")[0]
    if module_name.endswith(".py"):
        import ray.cloudpickle  # only for --engine ray

        module = sys.modules[Path(module_name).stem]
        ray.cloudpickle.register_pickle_by_value(module)  # type: ignore[no-untyped-call]


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise CommandError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise CommandError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs (dataclasses and pickling look modules up), and its directory
    # importable, as when the file runs as a script.
    sys.modules.setdefault(spec.name, module)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise CommandError(f"cannot import {path}: {_describe(exc)}") from exc
    return module


def _is_pipeline(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, af.Pipeline)


def _is_agent(value: object) -> bool:
    return isinstance(value, af.Agent) or (isinstance(value, type) and issubclass(value, af.Agent))


def _flow_of(target: Any) -> af.Flow:
    """The flow ``target`` runs, to read its scopes; usage error if they cannot run."""
    flow = getattr(target, "flow", None) if _is_pipeline(target) else target
    if flow is None:
        raise CommandError(f"Pipeline '{target.__name__}' has no flow; set flow = A >> B")
    try:
        return af.Flow(flow)
    except TypeError as exc:
        raise CommandError(str(exc)) from exc


def _scopes(flow: af.Flow) -> list[BatchingScope]:
    try:
        return flow.scopes()
    except af.ConfigurationError as exc:
        raise CommandError(str(exc)) from exc


# -- run ----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    target = _load(args.target)
    if args.engine == "ray":
        _send_by_value(args.target)
    flow = _flow_of(target)
    scopes = _scopes(flow)
    field = _field(args.field, flow, scopes)
    if args.key is not None and args.state is None:
        raise CommandError("--key names the key column for --state: give --state too")
    if args.ray_address is not None and args.engine != "ray":
        raise CommandError("--ray-address names the cluster of --engine ray: give that too")
    if args.output is not None and not scopes:
        raise CommandError(f"{args.target} has no streaming scope whose field --output could take")
    store = None if args.state is None else _store(args.state, args.key, scopes)
    if args.stream_size or args.max_concurrency or store is not None:
        target = _with_options(target, args.stream_size, args.max_concurrency, store)
        scopes = _scopes(_flow_of(target))
    source = _input(args.input, af.scan_parquet)
    engine = af.RayEngine(args.ray_address) if args.engine == "ray" else args.engine
    options = {"engine": engine, "progress": args.progress, "sink": args.output}
    delivered = 0  # the first scope's streams, completed in order
    try:
        with _stream(target, {field: source}, options) as parts:
            for _ in parts:
                delivered += 1
        result = parts.result
    except af.ConfigurationError as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt as exc:
        stats = getattr(exc, "execution_stats", None)
        done = delivered if stats is None else stats["successful_batches"]
        raise CommandError(_kept(scopes, done, args.output), EXIT_INTERRUPTED) from exc
    except af.BatchExecutionError as exc:
        done = _saved_streams(scopes)
        kept = _kept(scopes, delivered if done is None else done, args.output)
        raise CommandError(f"{_describe(exc)} {kept}", EXIT_FAILED) from exc
    except Exception as exc:  # an agent's own error outside a scope, or the store's
        raise CommandError(_describe(exc), EXIT_FAILED) from exc
    assert result is not None  # the stream ran to its end
    for name, stats in zip(result.scopes, result.stats, strict=True):
        print(_summary(name, stats))
    if args.output is not None:
        print(f"wrote {args.output}")
    return EXIT_OK


def _field(given: str | None, flow: af.Flow, scopes: list[BatchingScope]) -> str:
    """The field the input goes in: ``--field``, else the first scope's ``over``."""
    config = scopes[0].streaming_config() if scopes else None
    over = None if config is None else config.over
    if given is None:
        if over is None:
            problem = "its first scope names no field" if scopes else "it has no streaming scope"
            raise CommandError(f"which field does the input go in? {problem}: pass --field NAME")
        return over
    # Only an agent before the scope could make the field it streams over from another one.
    first = bool(scopes) and scopes[0].trigger_agent is flow.agents[0]
    if first and over is not None and given != over:
        raise CommandError(
            f"unknown field '{given}': agent '{scopes[0].trigger_name}' streams over '{over}' "
            f"(leave out --field, or pass --field {over})"
        )
    return given


def _store(path: Path, key: str | None, scopes: list[BatchingScope]) -> af.DuckDBState:
    """The store ``--state`` names, for the first scope: its table and key as declared."""
    if not scopes:
        raise CommandError("--state keeps a streaming scope's work, and there is no scope")
    scope = scopes[0]
    config = scope.streaming_config()
    assert config is not None  # a scope's trigger declares streaming
    if key is not None and config.key not in (None, key):
        raise CommandError(
            f"--key {key}: agent '{scope.trigger_name}' declares key='{config.key}', which "
            "wins; leave out --key"
        )
    key = key or config.key or getattr(config.state, "key", None)
    if not isinstance(key, str):
        raise CommandError(
            f"--state needs the key column of the input: pass --key COLUMN (agent "
            f"'{scope.trigger_name}' declares no key=)"
        )
    table = getattr(config.state, "table", None)
    if not isinstance(table, str):
        table = _snake_case(scope.trigger_name)
    try:
        return af.DuckDBState(path, table=table, key=key)
    except af.ConfigurationError as exc:
        raise CommandError(str(exc)) from exc


def _snake_case(name: str) -> str:
    """``QuickFit`` → ``quick_fit``, ``HTTPFetcher`` → ``http_fetcher``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _with_options(
    target: Any, stream_size: int | None, max_concurrency: int | None, store: af.DuckDBState | None
) -> Any:
    on = target if _is_pipeline(target) else af.Flow(target)
    try:
        return on.with_options(
            stream_size=stream_size, max_concurrency=max_concurrency, state=store
        )
    except af.ConfigurationError as exc:
        raise CommandError(str(exc)) from exc


def _input(path: Path, read: Callable[[Path], _T]) -> _T:
    """``--input`` read by ``read`` (a scan or a whole read); a usage error if it cannot be."""
    if not path.exists():
        raise CommandError(f"--input {path}: no such file or directory")
    try:
        return read(path)
    except af.ArrowflowError as exc:
        raise CommandError(f"--input {path}: {exc}") from exc


def _stream(target: Any, fields: Mapping[str, Any], options: Mapping[str, Any]) -> af.FlowStream:
    """Run ``target`` as its kind runs: a pipeline with the fields as its context."""
    if _is_pipeline(target):
        return target(fields).stream(**options)  # type: ignore[no-any-return]
    return af.Flow(target).stream(fields, **options)


def _state_of(scopes: list[BatchingScope]) -> object:
    """The state store the first scope runs with, if any."""
    config = scopes[0].streaming_config() if scopes else None
    return None if config is None else config.state


def _saved_streams(scopes: list[BatchingScope]) -> int | None:
    """The streams the first scope's last run saved to its DuckDB store, if it has one (with
    several streams at once, streams after a failing one may have completed and been saved)."""
    store = _state_of(scopes)
    if not isinstance(store, af.DuckDBState):
        return None
    try:
        runs = store.runs()
    except af.ArrowflowError:
        return None
    done = runs["successful_batches"][-1].as_py() if runs.num_rows else None
    return None if done is None else int(done)


def _kept(scopes: list[BatchingScope], done: int, output: str | None) -> str:
    """What is left of a run that stopped: the first scope's completed streams, and where."""
    if not scopes:
        return "The flow has no streaming scope: nothing was kept."
    store = _state_of(scopes)
    kept = f"{_plural(done, 'stream')} of '{scopes[0].trigger_name}' completed"
    if isinstance(store, af.DuckDBState):
        kept += f" and {'was' if done == 1 else 'were'} saved to {store.path}: run the same "
        kept += "command again to resume."
    elif store is not None:
        kept += " and went to the scope's state store."
    else:
        kept += "; without --state a rerun starts over."
    # Only a local Parquet output has a partial file to point at.
    local = output is not None and "::" not in output and "://" not in output
    partial = Path(f"{output}.partial") if local else None
    if partial is not None and partial.exists():
        kept += f" Rows written so far are in {partial}."
    return kept


def _summary(name: str, stats: Mapping[str, Any]) -> str:
    """One line for a scope's run: streams, rows in and out, skipped, loaded, seconds."""
    streams: pa.Table = stats["streams"]
    rows_out = int(pc.sum(streams["rows_out"]).as_py() or 0) if streams.num_rows else 0
    failed = stats["failed_batches"]
    started, ended = stats["start_time"], stats["end_time"]
    seconds = 0.0 if started is None or ended is None else (ended - started).total_seconds()
    return (
        f"{name}: {_plural(stats['total_batches'], 'stream')}"
        f"{f' ({failed} failed)' if failed else ''}, {stats['total_items']:,} rows in, "
        f"{rows_out:,} out, {stats['skipped_items']:,} skipped, {stats['loaded_items']:,} "
        f"loaded, {seconds:.3f}s"
    )


# -- demo, bench, stats -------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from arrowflow import demo

    if not demo.DEFAULT_INPUT.is_file():
        raise CommandError(demo.missing_input(demo.DEFAULT_INPUT))
    try:
        demo.run_demo(stream_size=args.stream_size or demo.STREAM_SIZE, fresh=args.fresh)
    except af.ConfigurationError as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt as exc:
        raise CommandError(
            f"the analysed companies are kept in {demo.DEFAULT_STATE}: run again to resume",
            EXIT_INTERRUPTED,
        ) from exc
    except af.ArrowflowError as exc:
        raise CommandError(str(exc), EXIT_FAILED) from exc
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    target = _load(args.target)
    flow = _flow_of(target)
    field = _field(args.field, flow, _scopes(flow))
    if args.plot is not None:
        _use_matplotlib()  # before the benchmark: its results would be lost to a failure
    # Read whole: every round at every size runs on the same input.
    table = _input(args.input, af.read_parquet)
    try:
        report = af.benchmark_stream_sizes(
            target,
            args.stream_sizes,
            repeat=args.repeat,
            warmup=args.warmup,
            context={field: table},
        )
    except af.ConfigurationError as exc:
        raise CommandError(str(exc)) from exc
    except KeyboardInterrupt as exc:
        raise CommandError("the benchmark was stopped before its end", EXIT_INTERRUPTED) from exc
    except Exception as exc:
        raise CommandError(_describe(exc), EXIT_FAILED) from exc
    if args.json:
        print(json.dumps({"best": report.best, "rows": report.table.to_pylist()}))
    else:
        print(report)
        print(f"best stream size: {report.best:,}")
    if args.plot is not None:
        try:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            report.plot().figure.savefig(args.plot, bbox_inches="tight")
        except OSError as exc:
            raise CommandError(f"--plot {args.plot}: {exc}") from exc
    return EXIT_OK


def _use_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'arrowflow[plot]'") from None
    # No window: the figure only goes to a file (and a server has no display).
    matplotlib.use("Agg")


def _stats(args: argparse.Namespace) -> int:
    from arrowflow.state.inspect import inspect_state

    try:
        summary = inspect_state(args.state, table=args.table)
    except af.ArrowflowError as exc:
        raise CommandError(str(exc)) from exc
    print(f"{summary.path}: arrowflow state, layout version {summary.layout_version}")
    if not summary.tables:
        print("no tables yet")
    for table in summary.tables:
        print()
        print("\n".join(_describe_table(table)))
    return EXIT_OK


def _describe_table(table: TableState) -> list[str]:
    key = f"key {table.key}" if table.key is not None else "no key yet"
    lines = [
        f"table {table.name} ({key}): {table.result_rows:,} result rows, "
        f"{table.rows_done:,} rows done"
    ]
    for row in table.done.to_pylist():
        if row["fingerprint"] is None:
            lines.append(f"  {row['rows_done']:,} rows stored but not done (stale)")
            continue
        latest = " (last run)" if row["fingerprint"] == table.fingerprint else ""
        scope = json.loads(row["description"])
        agents = ", ".join(scope.get("agents") or []) or "none"
        version = scope.get("version")
        lines.append(
            f"  fingerprint {row['fingerprint'][:12]}{latest}: {row['rows_done']:,} rows done "
            f"by {agents} over field {scope.get('field')!r}, key {scope.get('key')!r}"
            + ("" if version is None else f", version {version!r}")
        )
    lines.append(f"  runs: {table.runs.num_rows}")
    for run in table.runs.to_pylist():
        ended = "-" if run["ended_at"] is None else f"{run['ended_at']:%Y-%m-%d %H:%M:%S}"
        totals = ""
        if run["total_batches"] is not None:
            totals = (
                f", {run['successful_batches']}/{run['total_batches']} streams ok, "
                f"{run['failed_batches']} failed, {run['total_items']:,} rows "
                f"({run['skipped_items']:,} skipped, {run['loaded_items']:,} loaded)"
            )
        lines.append(
            f"    #{run['run_id']} {run['status']}: {run['started_at']:%Y-%m-%d %H:%M:%S} -> "
            f"{ended}{totals}"
        )
    if table.failures.num_rows:
        lines.append(f"  failures: {table.failures.num_rows}")
    for failure in table.failures.to_pylist():
        run = "-" if failure["run_id"] is None else f"#{failure['run_id']}"
        lines.append(
            f"    run {run}, stream {failure['stream_num']}, {failure['rows']:,} rows: "
            f"{_one_line(failure['error'])}"
        )
    return lines


# -- messages -----------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """An exception as one phrase, with the notes arrowflow adds (``raised by agent 'X'``)."""
    notes = [note for note in getattr(exc, "__notes__", ()) if isinstance(note, str)]
    if isinstance(exc, af.ArrowflowError):
        text = str(exc).split(_API_ADVICE)[0]
    else:
        text = f"{type(exc).__name__}: {exc}"
    return "; ".join([text, *notes])


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
