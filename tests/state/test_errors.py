"""A database the store cannot use, or a statement that fails, gets a message of its own.

Each refusal names the path, says what happened and what to do; only a file that is not a
usable DuckDB database is to be moved away. A refused file is left byte for byte as it was.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from state_helpers import Build, MakeStore, run

import arrowflow as af
from arrowflow.state._layout import open_database, store_errors, transaction, translated

MOVE_AWAY = "move it away (arrowflow then starts a new one)"


@pytest.fixture
def database(tmp_path: Path, scoring_agent: Build, make_companies: Callable[..., pa.Table]) -> Path:
    """A state database with results, written by a run, in a directory of its own."""
    path = tmp_path / "db" / "state.duckdb"
    with af.DuckDBState(path) as store:
        run(scoring_agent(store, 10), companies=make_companies(30))
    return path


@pytest.fixture
def refused(
    make_store: MakeStore,
    scoring_agent: Build,
    calls: list[list[Any]],
    make_companies: Callable[..., pa.Table],
) -> Callable[..., str]:
    """``refused(path, chmod=None)``: run a store on ``path``, expect a refusal before any agent.

    ``chmod=(target, mode)`` restricts ``target`` during the run only. Returns the message;
    checks that it names the path and that the file and its directory are left as they were.
    """

    def attempt(path: Path, chmod: tuple[Path, int] | None = None) -> str:
        before = _snapshot(path)
        calls.clear()
        store = make_store(path)
        target, mode = chmod or (path, None)
        restored = target.stat().st_mode
        if mode is not None:
            target.chmod(mode)
        try:
            with pytest.raises(af.ExecutionError) as info:
                run(scoring_agent(store, 10), companies=make_companies(30))
        finally:
            target.chmod(restored)
        assert calls == []
        assert not store.is_open
        assert _snapshot(path) == before
        message = str(info.value)
        assert str(path) in message
        return message

    return attempt


def _snapshot(path: Path) -> tuple[bytes, list[str]]:
    return path.read_bytes(), sorted(os.listdir(path.parent))


@pytest.fixture
def chmod_restricts(tmp_path: Path) -> None:
    """Skip when running as root with chmod not restricting it (root ignores permissions)."""
    if os.geteuid() != 0:
        return
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0)
    try:
        probe.read_text()
    except PermissionError:
        return
    finally:
        probe.chmod(stat.S_IRUSR | stat.S_IWUSR)
    pytest.skip("running as root: chmod does not restrict this process")


# -- locks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"read_only": True}, {"config": {"threads": 1}}],
    ids=["read_only", "other_config"],
)
def test_a_database_this_process_has_open_otherwise_is_refused(
    database: Path,
    options: dict[str, Any],
    refused: Callable[..., str],
    scoring_agent: Build,
    make_companies: Callable[..., pa.Table],
) -> None:
    mine = duckdb.connect(str(database), **options)
    try:
        message = refused(database)
    finally:
        mine.close()

    assert "already open in this process" in message
    assert "con.close()" in message
    assert MOVE_AWAY not in message.lower()
    # Once that connection is closed, the store opens the file.
    with af.DuckDBState(database) as store:
        result = run(scoring_agent(store, 10), companies=make_companies(30))
    assert result.stats[0]["skipped_items"] == 30


HOLD = (
    "import duckdb, sys\n"
    "con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == 'ro')\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_a_database_another_process_holds_is_refused_naming_that_process(
    database: Path, mode: str, refused: Callable[..., str]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(database), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        message = refused(database)
    finally:
        holder.communicate("", timeout=60)

    assert f"locked by another process (PID {holder.pid}: " in message
    assert "python" in message.lower()
    assert ("which has it open read-only" in message) == (mode == "ro")
    assert MOVE_AWAY not in message.lower()


# -- permissions ----------------------------------------------------------------------------


@pytest.mark.usefixtures("chmod_restricts")
@pytest.mark.parametrize(
    ("target", "mode", "fragment"),
    [
        ("file", 0, "cannot be read by this user"),
        ("file", 0o444, "cannot be written by this user (it is read-only)"),
        ("directory", 0o555, "cannot create files"),
        ("directory", 0, "cannot enter"),
    ],
    ids=["file_unreadable", "file_read_only", "directory_read_only", "directory_closed"],
)
def test_a_database_this_user_may_not_use_is_refused(
    database: Path, target: str, mode: int, fragment: str, refused: Callable[..., str]
) -> None:
    changed = database if target == "file" else database.parent

    message = refused(database, chmod=(changed, mode))

    assert fragment in message
    assert "chmod" in message
    assert MOVE_AWAY not in message.lower()
    if target == "directory" and mode:
        assert f"{database}.wal" in message


# -- files that are not a usable DuckDB database ---------------------------------------------


def _overwrite(at: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with path.open("r+b") as file:
            file.seek(at)
            file.write(b"\xde\xad\xbe\xef" * 16)

    return damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def _text(path: Path) -> None:
    path.write_text("id,name\n1,Acme\n2,Globex\n")


def _parquet(path: Path) -> None:
    path.unlink()
    pq.write_table(pa.table({"id": [1, 2, 3]}), path)


def _sqlite(path: Path) -> None:
    import sqlite3

    path.unlink()
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE quick_fit (id INTEGER)")
    con.close()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_overwrite(100), "cannot be opened: the database file is damaged (Corrupt"),
        (_overwrite(3 * 4096 + 8), "cannot be opened: the database file is damaged (Corrupt"),
        (_truncate, "cannot be opened: the database file is damaged (IO Error: Could not read"),
        (_overwrite(0), "not a DuckDB database: it is another kind of file, or a DuckDB file"),
        (_text, "not a DuckDB database: it is a text file"),
        (_parquet, "not a DuckDB database: it is a Parquet file"),
        (_sqlite, "not a DuckDB database: it is a SQLite database"),
        (_empty, "not a DuckDB database: it is empty"),
    ],
    ids=[
        "header_overwritten",
        "block_overwritten",
        "truncated",
        "magic_overwritten",
        "text",
        "parquet",
        "sqlite",
        "empty",
    ],
)
def test_a_file_that_is_not_a_usable_duckdb_database_is_to_be_moved_away(
    database: Path,
    damage: Callable[[Path], None],
    fragment: str,
    refused: Callable[..., str],
) -> None:
    damage(database)

    message = refused(database)

    assert fragment in message
    assert MOVE_AWAY in message.lower()


def _duckdb_checksum(block: bytes) -> int:
    """DuckDB's checksum of a header block: a multiply-xor hash of its 64-bit words."""
    value = 5381
    for start in range(0, len(block), 8):
        value ^= int.from_bytes(block[start : start + 8], "little") * 0xBF58476D1CE4E5B9
        value &= (1 << 64) - 1
    return value


def test_a_database_of_another_duckdb_version_is_refused_without_moving_it(
    database: Path, refused: Callable[..., str]
) -> None:
    header = bytearray(database.read_bytes()[:4096])
    assert header[8:12] == b"DUCK"
    header[12:20] = (10_000).to_bytes(8, "little")  # the storage version, newer than any
    header[0:8] = _duckdb_checksum(bytes(header[8:])).to_bytes(8, "little")
    with database.open("r+b") as file:
        file.write(header)

    message = refused(database)

    assert "another version of DuckDB" in message
    assert duckdb.__version__ in message
    assert MOVE_AWAY not in message.lower()


# -- an arrowflow schema arrowflow did not write ----------------------------------------------


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        (["CREATE TABLE arrowflow.jobs (id BIGINT, name VARCHAR)"], "jobs"),
        (["CREATE TABLE arrowflow.meta (key INTEGER, payload BLOB)"], "meta"),
        (["CREATE VIEW arrowflow.meta AS SELECT 'layout_version' AS name, '1' AS value"], "meta"),
    ],
    ids=["its_own_tables", "its_own_meta_table", "a_view"],
)
def test_a_foreign_arrowflow_schema_is_refused_and_left_untouched(
    tmp_path: Path, statements: list[str], found: str, refused: Callable[..., str]
) -> None:
    path = tmp_path / "theirs.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE SCHEMA arrowflow")
        for statement in statements:
            con.execute(statement)

    message = refused(path)

    assert "has a schema 'arrowflow' that arrowflow did not write" in message
    assert f"tables: {found}" in message
    assert "left as it is" in message
    assert MOVE_AWAY not in message.lower()


def test_an_unknown_layout_version_is_refused_without_moving_it(
    database: Path, refused: Callable[..., str]
) -> None:
    with duckdb.connect(str(database)) as con:
        con.execute("UPDATE arrowflow.meta SET value = 'v-one' WHERE name = 'layout_version'")

    message = refused(database)

    assert "unknown layout version 'v-one'" in message
    assert "left as it is" in message
    assert MOVE_AWAY not in message.lower()


# -- statements of the store: translated, interrupts untouched ------------------------------

WHERE = "State table 'quick_fit' (state.duckdb)"


def test_a_damaged_block_read_by_a_statement_is_translated(tmp_path: Path) -> None:
    path = tmp_path / "state.duckdb"
    con = open_database(str(path))
    con.execute("CREATE TABLE big AS SELECT range AS id, range * 2 AS score FROM range(300000)")
    block = con.sql("SELECT max(block_id) FROM pragma_storage_info('big')").fetchall()[0][0]
    size = con.sql("SELECT block_size FROM pragma_database_size()").fetchall()[0][0]
    con.close()
    with path.open("r+b") as file:
        file.seek(3 * 4096 + block * size + 100)  # past the three header blocks
        file.write(b"\xff" * 64)
    con = open_database(str(path))  # the damage is not in arrowflow's tables

    try:
        with pytest.raises(af.ExecutionError) as info, store_errors(WHERE):
            con.sql("SELECT sum(score) FROM big").fetchall()
    finally:
        con.close()

    message = str(info.value)
    assert message.startswith(f"{WHERE}: the database file is damaged (")
    assert MOVE_AWAY in message.lower()
    assert isinstance(info.value.__cause__, duckdb.Error)


def test_running_out_of_memory_is_translated() -> None:
    con = duckdb.connect()
    con.execute("SET memory_limit = '20MB'")

    with pytest.raises(af.ExecutionError) as info, store_errors(WHERE):
        con.sql("SELECT list(range) FROM range(50000000)").fetchall()

    con.close()
    assert str(info.value).startswith(f"{WHERE}: DuckDB ran out of memory (Out of Memory Error")
    assert "rerun" in str(info.value)
    assert isinstance(info.value.__cause__, duckdb.OutOfMemoryException)


@pytest.mark.usefixtures("chmod_restricts")
def test_a_write_the_directory_forbids_is_translated(tmp_path: Path) -> None:
    path = tmp_path / "db" / "state.duckdb"
    con = open_database(str(path))
    con.execute("CHECKPOINT")  # the journal is gone: the next write creates it anew
    path.parent.chmod(0o555)
    try:
        with pytest.raises(af.ExecutionError) as info, store_errors(WHERE):
            con.execute("CREATE TABLE written AS SELECT 1 AS id")
    finally:
        path.parent.chmod(0o755)
        with suppress(duckdb.Error):
            con.close()

    assert str(info.value).startswith(f"{WHERE}: permission denied (")
    assert "chmod" in str(info.value)
    assert MOVE_AWAY not in str(info.value).lower()


@pytest.mark.parametrize(
    ("error", "what"),
    [
        (duckdb.IOException('IO Error: Could not write file "x": No space left on device'), "disk"),
        (duckdb.IOException('IO Error: Could not read from file "x": Input/output error'), "I/O"),
        (
            duckdb.FatalException(
                "FATAL Error: Failed: database has been invalidated because of a previous fatal "
                "error. The database must be restarted prior to being used again."
            ),
            "unusable",
        ),
    ],
    ids=["disk_full", "io_error", "invalidated"],
)
def test_failures_of_the_machine_are_translated(error: duckdb.Error, what: str) -> None:
    with pytest.raises(af.ExecutionError) as info, store_errors(WHERE):
        raise error

    message = str(info.value)
    assert message.startswith(f"{WHERE}: ")
    assert what in message.removeprefix(WHERE).split("(")[0]
    assert str(error) in message
    assert info.value.__cause__ is error
    assert MOVE_AWAY not in message.lower()


def test_any_other_duckdb_error_names_where_and_keeps_duckdb_words() -> None:
    con = duckdb.connect()
    with pytest.raises(af.ExecutionError) as info, store_errors(WHERE):
        con.sql("SELECT * FROM nowhere").fetchall()
    con.close()

    message = str(info.value)
    assert message.startswith(f"{WHERE}: DuckDB failed (Catalog Error: Table with name nowhere")
    assert isinstance(info.value.__cause__, duckdb.CatalogException)


def test_translated_chains_the_original_without_raise_from() -> None:
    original = duckdb.IOException("IO Error: No space left on device")

    error = translated(original, WHERE)

    assert isinstance(error, af.ExecutionError)
    assert error.__cause__ is original
    assert str(error).startswith(f"{WHERE}: the disk is full")


@pytest.fixture
def interrupted() -> Iterator[duckdb.Error]:
    """A real ``duckdb.InterruptException``, from a statement interrupted by another thread."""
    con = duckdb.connect()
    done = threading.Event()

    def interrupt() -> None:
        while not done.wait(0.01):
            con.interrupt()

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        con.sql("SELECT count(*) FROM range(1000000000000)").fetchall()
    except duckdb.Error as exc:
        yield exc
    else:
        pytest.fail("the statement was not interrupted")
    finally:
        done.set()
        thread.join()
        con.close()


def test_interrupts_are_never_translated(interrupted: duckdb.Error) -> None:
    assert isinstance(interrupted, duckdb.InterruptException)
    for interrupt in (interrupted, duckdb.Error("Query interrupted")):
        with pytest.raises(duckdb.Error) as info, store_errors(WHERE):
            raise interrupt
        assert info.value is interrupt


def test_other_exceptions_pass_through_store_errors() -> None:
    with pytest.raises(KeyError, match="id"), store_errors(WHERE):
        raise KeyError("id")


def test_a_failing_rollback_keeps_the_error_that_caused_it() -> None:
    con = duckdb.connect()

    def fail_in_a_transaction() -> None:
        with transaction(con):
            con.close()  # ROLLBACK fails: the connection is gone
            raise ValueError("the first error")

    with pytest.raises(ValueError, match="the first error") as info:
        fail_in_a_transaction()

    assert any("ROLLBACK failed too" in note for note in info.value.__notes__)


@pytest.mark.parametrize("name", ["arrowflow.duckdb", "Arrowflow.state.db", "arrowflow"])
def test_a_file_named_like_the_bookkeeping_schema_is_refused_up_front(
    tmp_path: Path, name: str
) -> None:
    """DuckDB names a file's catalog after the file: 'arrowflow' would make every query of
    the bookkeeping schema ambiguous."""
    with pytest.raises(af.ConfigurationError, match="another name"):
        af.DuckDBState(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
