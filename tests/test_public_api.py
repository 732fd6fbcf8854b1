"""The public surface of ``arrowflow`` (DESIGN §1, §6; STYLE 2)."""

from __future__ import annotations

import subprocess
import sys

import arrowflow as af

REQUIRED = {
    "Agent",
    "ArrowflowError",
    "BatchExecutionError",
    "BatchingScope",
    "BatchingScopeManager",
    "ConfigurationError",
    "ExecutionError",
    "Flow",
    "Pipeline",
    "PipelineBatchExecutor",
    "agent",
    "ends_batching",
    "in_chunks_of",
    "intelligent_batching",
    "intelligent_streaming",
    "triggers_batching",
    "benchmark_stream_sizes",
    "StreamSizeReport",
}
# Optional libraries, CLI libraries and the CLI itself: `import arrowflow` loads none of them.
OPTIONAL = ("polars", "ray", "tqdm", "matplotlib", "pandas", "click", "typer", "arrowflow.cli")


def test_all_is_sorted_and_unique() -> None:
    assert list(af.__all__) == sorted(af.__all__)
    assert len(set(af.__all__)) == len(af.__all__)


def test_every_name_in_all_is_importable() -> None:
    for name in af.__all__:
        assert getattr(af, name, None) is not None, name
    namespace: dict[str, object] = {}
    exec("from arrowflow import *", namespace)
    assert set(af.__all__) <= set(namespace)


def test_contract_names_are_exported() -> None:
    missing = REQUIRED - set(af.__all__)
    assert not missing


def test_error_hierarchy() -> None:
    assert issubclass(af.ConfigurationError, af.ArrowflowError)
    assert issubclass(af.ConfigurationError, ValueError)
    assert issubclass(af.ExecutionError, af.ArrowflowError)
    assert issubclass(af.BatchExecutionError, af.ExecutionError)
    assert not issubclass(af.ExecutionError, ValueError)


def test_import_does_not_load_optional_libraries() -> None:
    code = (
        "import sys, arrowflow\n"
        f"loaded = sorted(m for m in {OPTIONAL!r} if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == ""


def _public_docstrings() -> dict[str, str]:
    """Docstrings of the public modules, their public classes and functions, and members."""
    import importlib
    import inspect
    import pkgutil

    docs: dict[str, str] = {}
    modules = [af] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(af.__path__, prefix="arrowflow.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    for module in modules:
        docs[module.__name__] = module.__doc__ or ""
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value):
                for member_name, member in vars(value).items():
                    function = getattr(member, "__func__", getattr(member, "fget", member))
                    public = not member_name.startswith("_") or member_name == "__init__"
                    if public and inspect.isfunction(function):
                        docs[f"{module.__name__}.{name}.{member_name}"] = function.__doc__ or ""
            if inspect.isclass(value) or inspect.isfunction(value):
                docs[f"{module.__name__}.{name}"] = value.__doc__ or ""
    return docs


def test_public_docstrings_stand_alone() -> None:
    """DESIGN.md does not ship with the package, so no docstring may send readers to it."""
    docs = _public_docstrings()
    assert "arrowflow.flow.Flow.run" in docs
    assert "arrowflow.state.duckdb.DuckDBState" in docs
    assert sorted(name for name, doc in docs.items() if "DESIGN §" in doc) == []
