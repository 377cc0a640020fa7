"""Clock the library's steps from outside: wrap its functions for a benchmark's run.

Each wrapped call appends ``(label, start, end)``, read on the clock given
(``time.perf_counter`` for wall time, ``time.thread_time`` for CPU), to a list.
Wrapped where the name is defined and wherever another module bound it by
name; an older library that lacks a step is measured without it. A wrapped
call costs a few microseconds. For ``coop_timeline.py`` and ``cpu_timeline.py``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

#: (label, module, attribute, owner class or None).
Step = tuple[str, str, str, "str | None"]
Mark = tuple[str, float, float]


def _wrap(
    label: str, func: Callable[..., Any], clock: Callable[[], float], marks: list[Mark]
) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(func):

        @functools.wraps(func)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await func(*args, **kwargs)
            finally:
                marks.append((label, start, clock()))

        return timed_async

    @functools.wraps(func)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return func(*args, **kwargs)
        finally:
            marks.append((label, start, clock()))

    return timed


def instrument(
    steps: list[Step],
    marks: list[Mark],
    clock: Callable[[], float],
    package: str = "qmpshutdown",
) -> list[str]:
    """Wrap every step that exists in *package*; return the labels of those wrapped."""
    found = []
    for label, module_name, attribute, owner in steps:
        try:
            module = importlib.import_module(f"{package}.{module_name}")
        except ImportError:
            continue
        holder = getattr(module, owner) if owner else module
        func = getattr(holder, attribute, None)
        if func is None:
            continue
        wrapped = _wrap(label, func, clock, marks)
        setattr(holder, attribute, wrapped)
        if owner is None:  # also where other modules bound it by name
            for name, other in list(sys.modules.items()):
                if name.startswith(package) and getattr(other, attribute, None) is func:
                    setattr(other, attribute, wrapped)
        found.append(label)
    return found
