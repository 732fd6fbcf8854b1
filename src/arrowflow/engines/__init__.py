"""Where a scope's streams run: ``engine="local"`` (this process) or ``engine="ray"``.

The local engine is the executor itself (:mod:`arrowflow.executor`): a stream runs on the run's
thread or on its pool. The Ray engine (:mod:`arrowflow.engines.ray`) sends each stream's agents
to worker processes and keeps everything else on the driver. Neither module imports Ray until
a run asks for it.
"""

from __future__ import annotations

from typing import Any

from arrowflow.engines.ray import RayEngine
from arrowflow.exceptions import ConfigurationError

__all__ = ["ENGINES", "RayEngine", "engine_for"]

#: The engines a run accepts by name.
ENGINES = ("local", "ray")


def engine_for(engine: Any) -> RayEngine | None:
    """The engine an ``engine=`` option names: ``None`` for the local one, a
    :class:`RayEngine` for ``"ray"`` (a new one, started and stopped with the run) or for the
    ``RayEngine`` given; ``ConfigurationError`` for anything else, and for ``"ray"`` when Ray
    is not installed."""
    if isinstance(engine, RayEngine):
        return engine
    if engine == "local":
        return None
    if engine != "ray":
        raise ConfigurationError(
            f"Unknown engine {engine!r}; available: {', '.join(map(repr, ENGINES))}, or an "
            "af.RayEngine(...)."
        )
    return RayEngine()
