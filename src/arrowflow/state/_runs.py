"""The runs of a scope against a state store: fingerprints and what is recorded of them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from arrowflow.exceptions import ExecutionError
from arrowflow.state._layout import SCHEMA, registered, transaction

if TYPE_CHECKING:
    from collections.abc import Mapping

    import duckdb

    from arrowflow.state._keys import KeyOrder
    from arrowflow.state._results import ResultTable
    from arrowflow.state._resume import Resume
    from arrowflow.state._writer import Writer

__all__ = [
    "SEEN",
    "Run",
    "check_owner",
    "check_seen",
    "fingerprint",
    "fingerprint_id",
    "record_run",
]

#: The keys each stream of a lazy input had, to find keys repeated across streams.
SEEN = "temp.arrowflow_seen"
_STREAMS_VIEW = "arrowflow_streams_view"
_BATCH_VIEW = "arrowflow_batch_view"


def fingerprint(
    agents: tuple[str, ...], field: str | None, key: str, version: str | int | None
) -> tuple[str, str]:
    """The sha256 (hex) of a scope's identity, and the canonical JSON it is computed from.

    Only names and the user's ``version`` go in — never callables or addresses, nor the stream
    size — so the same pipeline in a new process has the same fingerprint, and a change of
    stream size reuses the work done.

    Example:
        >>> fingerprint(("app.QuickFit",), "companies", "id", None)[1]
        '{"agents":["app.QuickFit"],"field":"companies","key":"id","version":null}'
    """
    description = json.dumps(
        {"agents": list(agents), "field": field, "key": key, "version": version},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(description.encode()).hexdigest(), description


@dataclass
class Run:
    """One run of a scope against the store (or the state callables used outside a run)."""

    field: str | None
    key: str
    fingerprint: str
    fp_id: int
    table: ResultTable
    run_id: int | None = None
    started_at: datetime | None = None
    # The scope_id of the run's streams: calls from another run's streams are refused.
    scope_id: str | None = None
    resume: Resume | None = None
    # Writes the run's results in the background (none for callables used outside a run).
    writer: Writer | None = None
    # Streams of a lazy input whose keys are in the seen table (duplicates across streams).
    seen: set[int] | None = None
    # Whether the keys of the whole input were checked unique and not null, or the streams
    # whose keys were (a lazy input).
    checked_all: bool = False
    checked: set[int] = dataclasses.field(default_factory=set)
    # A first run over a scan: its keys, checked as its streams come.
    order: KeyOrder | None = None
    # Streams whose rows not done have nothing stored (as this store's skip_if found): their
    # upserts need no deletes, unless a stream stored rows under keys outside its input.
    fresh_streams: set[int] = dataclasses.field(default_factory=set)
    fresh: bool = True


def check_owner(
    con: duckdb.DuckDBPyConnection,
    table: str,
    agents: tuple[str, ...],
    field: str | None,
    key: str,
    where: str,
) -> None:
    """Refuse a scope that shares ``table`` with another one.

    A scope is its agents, field and key (its ``version`` aside). A scope other than the one
    that last wrote the table is taken as its replacement (its fingerprint differs, so it
    recomputes everything) unless it wrote the table before: two scopes taking turns would
    each undo the other's done keys, and neither would ever resume.
    """
    found = con.sql(
        f"SELECT r.run_id, r.started_at, f.description FROM {SCHEMA}.runs r "
        f"JOIN {SCHEMA}.fingerprints f ON f.fingerprint = r.fingerprint "
        "WHERE lower(r.table_name) = lower(?) ORDER BY r.run_id DESC",
        params=[table],
    ).fetchall()
    if not found:
        return
    mine = (list(agents), field, key)
    runs = [(run_id, started, _scope_of(description)) for run_id, started, description in found]
    last = runs[0][2]
    if last == mine:
        return
    before = next((run for run in runs if run[2] == mine), None)
    if before is None:
        return
    run_id, started, owner = runs[0]
    raise ExecutionError(
        f"{where}: table '{table}' is shared by two scopes: its last run (#{run_id}, started "
        f"{started:%Y-%m-%d %H:%M:%S}) was of agents {', '.join(owner[0]) or 'none'} over field "
        f"{owner[1]!r}, key {owner[2]!r}, and run #{before[0]} before it of this one (agents "
        f"{', '.join(agents)} over field {field!r}, key {key!r}). Two scopes sharing a table "
        "undo each other's work and never resume: give each store its own table= (or path=)."
    )


def _scope_of(description: str) -> tuple[list[str], str | None, str | None]:
    scope = json.loads(description)
    return list(scope.get("agents") or []), scope.get("field"), scope.get("key")


def fingerprint_id(con: duckdb.DuckDBPyConnection, fp: str, description: str) -> int:
    """The small id standing for fingerprint ``fp`` in done tables (added when new)."""
    found = con.sql(
        f"SELECT id FROM {SCHEMA}.fingerprints WHERE fingerprint = ?", params=[fp]
    ).fetchall()
    if found:
        return int(found[0][0])
    new = int(
        con.sql(f"SELECT coalesce(max(id), 0) + 1 FROM {SCHEMA}.fingerprints").fetchall()[0][0]
    )
    con.execute(
        f"INSERT INTO {SCHEMA}.fingerprints VALUES (?, ?, ?, ?)",
        [new, fp, description, datetime.now(UTC)],
    )
    return new


def check_seen(
    con: duckdb.DuckDBPyConnection, run: Run, keys: pa.ChunkedArray, stream: int, where: str
) -> None:
    """Refuse keys that an earlier stream of the same lazy input already had."""
    assert run.seen is not None
    with registered(con, **{_BATCH_VIEW: pa.table({"key": keys})}):
        repeated = con.sql(
            f"SELECT key FROM {_BATCH_VIEW} WHERE key IN "
            f"(SELECT key FROM {SEEN} WHERE stream <> ?) LIMIT 6",
            params=[stream],
        ).fetchall()
        if repeated:
            shown = ", ".join(repr(row[0]) for row in repeated[:5])
            more = ", ..." if len(repeated) > 5 else ""
            raise ExecutionError(
                f"{where}: keys already seen in an earlier stream of the input: {shown}{more}. "
                "Keys must be unique in the input: deduplicate it, or choose another key=."
            )
        if stream not in run.seen:
            con.execute(f"INSERT INTO {SEEN} SELECT ?, key FROM {_BATCH_VIEW}", [stream])
            run.seen.add(stream)


def record_run(
    con: duckdb.DuckDBPyConnection, run: Run, stats: Mapping[str, Any], status: str
) -> None:
    """Close the run's row in ``runs`` with its status and totals; add its ``streams`` rows."""
    totals = [
        stats.get(name)
        for name in (
            "total_batches",
            "successful_batches",
            "failed_batches",
            "total_items",
            "processed_items",
            "skipped_items",
            "loaded_items",
        )
    ]
    with transaction(con):
        con.execute(
            f"UPDATE {SCHEMA}.runs SET status = ?, ended_at = ?, total_batches = ?, "
            "successful_batches = ?, failed_batches = ?, total_items = ?, processed_items = ?, "
            "skipped_items = ?, loaded_items = ? WHERE run_id = ?",
            [status, datetime.now(UTC), *totals, run.run_id],
        )
        streams = stats.get("streams")
        if isinstance(streams, pa.Table) and streams.num_rows:
            with registered(con, **{_STREAMS_VIEW: streams}):
                con.execute(
                    f"INSERT INTO {SCHEMA}.streams BY NAME SELECT ? AS run_id, * "
                    f"FROM {_STREAMS_VIEW}",
                    [run.run_id],
                )
