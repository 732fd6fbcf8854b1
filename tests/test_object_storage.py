"""Parquet anywhere (DESIGN §7): scan_parquet, read_parquet and ParquetSink on a local path, a
``file://`` URI, an explicit ``filesystem=`` and S3 (a moto server on 127.0.0.1), the same
tests for each; then what only an object store needs: publishing without a rename, and the
resume of a run whose input and output are both on S3."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import arrowflow as af
from arrowflow._row_counts import known_num_rows

if TYPE_CHECKING:
    from s3server import Bucket

pytest_plugins = ["s3server"]  # the s3 fixtures


@dataclass(frozen=True)
class Where:
    """One way of naming places for arrowflow, and the filesystem to look at them with."""

    name: str
    filesystem: pafs.FileSystem  # where the test writes its inputs and checks outputs
    root: str  # the test's directory, in ``filesystem``
    to_arg: Callable[[str], str]  # a path under ``root`` as arrowflow is given it
    options: dict[str, Any] = field(default_factory=dict)  # filesystem=, when explicit

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def arg(self, key: str) -> str:
        return self.to_arg(self.path(key))

    def files(self, prefix: str = "") -> list[str]:
        """The files under ``prefix`` (all by default), relative to the root, sorted."""
        where = self.path(prefix) if prefix else self.root
        selector = pafs.FileSelector(where, recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        start = len(self.root) + 1 if self.root else 0
        return sorted(info.path[start:] for info in infos if info.is_file)

    def write(self, key: str, table: pa.Table, **options: Any) -> None:
        self._parent(key)
        pq.write_table(table, self.path(key), filesystem=self.filesystem, **options)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._parent(key)
        with self.filesystem.open_output_stream(self.path(key)) as file:
            file.write(data)

    def _parent(self, key: str) -> None:
        parent = self.path(key).rpartition("/")[0]
        if parent and self.filesystem.type_name != "s3":  # S3 has no directories to make
            self.filesystem.create_dir(parent, recursive=True)

    def sink(self, key: str, **options: Any) -> af.ParquetSink:
        return af.ParquetSink(self.arg(key), **self.options, **options)


WHERE = ["local", "file-uri", "local-filesystem", "subtree", "s3-uri", "s3-filesystem"]


@pytest.fixture(params=WHERE)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    local = pafs.LocalFileSystem()
    if request.param == "local":
        return Where("local", local, str(tmp_path), str)
    if request.param == "file-uri":
        return Where("file-uri", local, str(tmp_path), lambda path: Path(path).as_uri())
    if request.param == "local-filesystem":
        return Where("local-filesystem", local, str(tmp_path), str, {"filesystem": local})
    if request.param == "subtree":
        # Not a LocalFileSystem: the sink publishes as it does where nothing renames.
        subtree = pafs.SubTreeFileSystem(str(tmp_path), local)
        return Where("subtree", subtree, "", str, {"filesystem": subtree})
    bucket: Bucket = request.getfixturevalue("s3")
    if request.param == "s3-uri":
        return Where(
            "s3-uri",
            bucket.filesystem,
            bucket.name,
            lambda path: bucket.uri(path[len(bucket.name) + 1 :]),
        )
    return Where(
        "s3-filesystem", bucket.filesystem, bucket.name, str, {"filesystem": bucket.filesystem}
    )


def _companies(n: int) -> pa.Table:
    ids = list(range(n))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "country": pa.array([("DE", "FR", "IT")[i % 3] for i in ids]),
            "year": pa.array([2023 + i % 2 for i in ids], pa.int64()),
            "employees": pa.array([(i * 7) % 100 for i in ids], pa.int64()),
        }
    )


def _corrupt_row_groups(data: bytes, groups: Iterable[int]) -> bytes:
    """A Parquet file (written without dictionaries) whose ``groups`` cannot be decoded: their
    pages are overwritten, the footer and the other row groups are intact."""
    metadata = pq.ParquetFile(pa.BufferReader(data)).metadata
    corrupt = bytearray(data)
    for group in groups:
        for number in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(number)
            start, size = chunk.data_page_offset, chunk.total_compressed_size
            corrupt[start : start + size] = b"\xff" * size
    return bytes(corrupt)


def _enrich(stream_size: int = 5, **options: Any) -> type[af.Agent]:
    """Adds ``double``; ``options`` go to the scope (``state=`` ...)."""

    @af.intelligent_streaming(stream_size, over="companies", **options)
    class Enrich(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            return {"companies": rows.append_column("double", pc.multiply(rows["employees"], 2))}

    return Enrich


def _doubled(table: pa.Table) -> pa.Table:
    return table.append_column("double", pc.multiply(table["employees"], 2))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("id")


# --------------------------------------------------------------------------- reading


def test_scan_reads_a_directory_and_knows_its_rows_from_the_footers(where: Where) -> None:
    table = _companies(50)
    for part in range(3):
        where.write(f"in/part-{part}.parquet", table.slice(part * 17, 17), row_group_size=6)
    reader = af.scan_parquet(where.arg("in"), batch_size=4, **where.options)
    assert known_num_rows(reader) == 50
    assert reader.read_all().equals(table)
    columns = af.scan_parquet(where.arg("in"), columns=["employees", "id"], **where.options)
    assert columns.read_all().equals(table.select(["employees", "id"]))


def test_filter_skips_the_row_groups_its_statistics_rule_out(where: Where) -> None:
    """Row groups 0 to 6 cannot be decoded: a filter that rules them out by their statistics
    reads the file anyway, so they were never read."""
    table = _companies(100)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=10, use_dictionary=False, compression="none")
    where.write_bytes("in.parquet", _corrupt_row_groups(sink.getvalue().to_pybytes(), range(7)))
    scan = af.scan_parquet(where.arg("in.parquet"), **where.options)
    with pytest.raises((OSError, pa.ArrowException)):
        scan.read_all()

    decided = af.scan_parquet(where.arg("in.parquet"), filter=pc.field("id") >= 70, **where.options)
    assert known_num_rows(decided) == 30  # the statistics decide every row group kept
    assert decided.read_all().equals(table.slice(70))

    expression = (pc.field("id") >= 75) & (pc.field("country") == "FR")
    partial = af.scan_parquet(
        where.arg("in.parquet"), columns=["id"], filter=expression, **where.options
    )
    assert known_num_rows(partial) is None  # row group 7 holds rows on both sides
    assert partial.read_all()["id"].to_pylist() == [76, 79, 82, 85, 88, 91, 94, 97]


def test_hive_partitions_become_columns_and_prune_files(where: Where) -> None:
    table = _companies(30)
    pq.write_to_dataset(
        table,
        where.path("in"),
        partition_cols=["country", "year"],
        filesystem=where.filesystem,
        basename_template="part-{i}.parquet",
    )
    where.write_bytes("in/country=XX/year=2023/part-0.parquet", b"not Parquet")
    with pytest.raises(af.ExecutionError, match="country=XX"):
        af.scan_parquet(where.arg("in"), **where.options)

    only_fr = pc.field("country") == "FR"
    reader = af.scan_parquet(where.arg("in"), filter=only_fr, **where.options)
    # The other partitions' files are never opened: the count is the FR files' footers.
    assert known_num_rows(reader) == 10
    scanned = reader.read_all()
    assert scanned.schema.field("country").type == pa.string()
    assert scanned.schema.field("year").type == pa.int32()  # inferred from the directory names
    expected = table.filter(only_fr).cast(scanned.select(table.column_names).schema)
    assert _sorted(scanned.select(table.column_names)).equals(expected)

    read = af.read_parquet(where.arg("in"), columns=["id", "year"], filter=only_fr, **where.options)
    assert sorted(read["id"].to_pylist()) == expected["id"].to_pylist()


def test_read_parquet_reads_a_file_with_columns_and_filter(where: Where) -> None:
    table = _companies(40)
    where.write("in.parquet", table, row_group_size=8)
    assert af.read_parquet(where.arg("in.parquet"), **where.options).equals(table)
    read = af.read_parquet(
        where.arg("in.parquet"), columns=["id"], filter=pc.field("id") < 3, **where.options
    )
    assert read.equals(table.select(["id"]).slice(0, 3))


# --------------------------------------------------------------------------- writing


def test_a_run_writes_one_file_through_the_sink(where: Where) -> None:
    table = _companies(23)
    where.write("in.parquet", table, row_group_size=4)
    rows = af.scan_parquet(where.arg("in.parquet"), **where.options)
    # A path or URI alone is enough for run(sink=...); with filesystem=, a ParquetSink.
    sink = where.sink("out/result.parquet") if where.options else where.arg("out/result.parquet")
    result = af.Flow(_enrich()).run(companies=rows, sink=sink)
    assert result["companies"].read_all().equals(_doubled(table))
    assert where.files("out") == ["out/result.parquet"]
    assert af.read_parquet(where.arg("out/result.parquet"), **where.options).equals(_doubled(table))


def test_a_partitioned_sink_writes_a_dataset_stream_by_stream(where: Where) -> None:
    table = _companies(40)
    sink = where.sink("out", partition_by=["country"], max_rows_per_file=4)
    result = af.Flow(_enrich(stream_size=6)).run(companies=table, sink=sink)

    # 14, 13 and 13 rows per country, at most 4 a file, numbered in order.
    expected_keys = [
        f"out/country={country}/part-{number:05d}.parquet"
        for country, files in (("DE", 4), ("FR", 4), ("IT", 4))
        for number in range(files)
    ]
    assert where.files("out") == ["out/_SUCCESS", *expected_keys]
    assert where.files("out.partial") == []
    for key in expected_keys:
        part = pq.read_table(where.path(key), filesystem=where.filesystem, partitioning=None)
        assert "country" not in part.column_names
        assert part.num_rows <= 4
        assert part["id"].to_pylist() == sorted(part["id"].to_pylist())  # run order

    read_back = result["companies"].read_all()  # typed as written, partition column included
    assert read_back.schema == _doubled(table).schema
    assert _sorted(read_back).equals(_doubled(table))
    scanned = af.scan_parquet(where.arg("out"), **where.options).read_all()
    assert _sorted(scanned.select(read_back.column_names)).equals(_doubled(table))


@pytest.mark.parametrize("layout", ["file", "dataset"])
def test_a_failed_run_publishes_nothing_and_keeps_the_earlier_output(
    where: Where, layout: str
) -> None:
    options: dict[str, Any] = {"partition_by": ["year"]} if layout == "dataset" else {}
    key = "out" if layout == "dataset" else "out.parquet"
    if layout == "dataset":
        where.write("out/year=1999/part-00000.parquet", _companies(3).drop_columns(["year"]))
    else:
        where.write(key, _companies(3))
    before = where.files()

    @af.intelligent_streaming(5, over="companies")
    class FailThird(af.Agent):
        def call(self, context: Any) -> None:
            if context["_batch_metadata"]["batch_number"] == 3:
                raise RuntimeError("quota exceeded")

    with pytest.raises(af.BatchExecutionError, match="quota exceeded"):
        af.Flow(FailThird).run(companies=_companies(30), sink=where.sink(key, **options))

    assert [name for name in where.files() if ".partial" not in name] == before
    earlier = af.read_parquet(where.arg(key), **where.options)
    assert earlier["id"].to_pylist() == [0, 1, 2]  # as it was
    partial = af.read_parquet(where.arg(f"{key}.partial"), **where.options)
    assert sorted(partial["id"].to_pylist()) == list(range(10))  # the streams before the third

    af.Flow(_enrich()).run(companies=_companies(30), sink=where.sink(key, **options))
    published = af.read_parquet(where.arg(key), **where.options)
    assert sorted(published["id"].to_pylist()) == list(range(30))  # the earlier output is gone
    assert not [name for name in where.files() if ".partial" in name]


# --------------------------------------------------------------------------- object stores


def test_the_output_is_only_at_the_partial_key_until_the_run_succeeds(s3: Bucket) -> None:
    sink = af.ParquetSink(s3.uri("out.parquet"))
    assert sink.path == s3.path("out.parquet")
    assert sink.partial_path == s3.path("out.parquet.partial")
    sink.write(_companies(5))
    reader = sink.read_back(_companies(0).schema)  # finishes the file, publishes nothing
    assert s3.keys() == ["out.parquet.partial"]
    sink.close()
    assert s3.keys() == ["out.parquet"]
    assert reader.read_all().equals(_companies(5))


def test_a_dataset_cut_short_while_published_is_whole_under_its_partial_prefix(
    s3: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying to the final keys fails after the first file: no _SUCCESS under ``path``,
    whose files are a part of the output, while ``<path>.partial`` still holds all of it."""
    import arrowflow._datasets

    make_parent = arrowflow._datasets.make_parent
    copied: list[str] = []

    def fail_second_copy(filesystem: pafs.FileSystem, path: str) -> None:
        if path.startswith(s3.path("out/")):
            copied.append(path)
            if len(copied) == 2:
                raise OSError("connection reset")
        make_parent(filesystem, path)

    monkeypatch.setattr(arrowflow._datasets, "make_parent", fail_second_copy)
    table = _companies(20)
    sink = af.ParquetSink(s3.uri("out"), partition_by=["country"])
    sink.write(table)
    with pytest.raises(af.ExecutionError, match="connection reset"):
        sink.close()
    assert s3.keys("out/") == ["out/country=DE/part-00000.parquet"]
    partial = af.scan_parquet(s3.uri("out.partial")).read_all()
    assert _sorted(partial.select(table.column_names)).equals(table)


def test_a_sink_needs_a_key_under_the_bucket(s3: Bucket) -> None:
    with pytest.raises(af.ConfigurationError, match="key under the bucket"):
        af.ParquetSink(s3.uri(""))


def test_resume_a_run_whose_input_and_output_are_on_s3(s3: Bucket, tmp_path: Path) -> None:
    """The first run fails at its fourth stream; the second computes only the rows not done,
    and what it publishes on S3 is what an uninterrupted run publishes."""
    table = _companies(40)
    pq.write_table(
        table, s3.path("in/companies.parquet"), filesystem=s3.filesystem, row_group_size=8
    )
    source, output = s3.uri("in/companies.parquet"), s3.uri("out/companies.parquet")
    store = af.DuckDBState(tmp_path / "state.duckdb", table="enrich", key="id")
    calls: list[int] = []
    failing = [True]

    @af.intelligent_streaming(5, over="companies", state=store)
    class Enrich(af.Agent):
        def call(self, context: Any) -> dict[str, Any]:
            rows = context["companies"]
            if failing[0] and context["_batch_metadata"]["batch_number"] == 4:
                raise RuntimeError("quota exceeded")
            calls.extend(rows["id"].to_pylist())
            return {"companies": _doubled(rows)}

    with pytest.raises(af.BatchExecutionError):
        af.Flow(Enrich).run(companies=af.scan_parquet(source), sink=output)
    assert calls == list(range(15))
    assert s3.keys("out") == ["out/companies.parquet.partial"]

    calls.clear()
    failing[0] = False
    result = af.Flow(Enrich).run(companies=af.scan_parquet(source), sink=output)
    assert calls == list(range(15, 40))
    assert s3.keys("out") == ["out/companies.parquet"]

    uninterrupted = s3.uri("out/uninterrupted.parquet")
    af.Flow(_enrich()).run(companies=af.scan_parquet(source), sink=uninterrupted)
    assert af.read_parquet(output).equals(af.read_parquet(uninterrupted))
    assert af.read_parquet(output).equals(_doubled(table))
    assert result["companies"].read_all().equals(_doubled(table))
