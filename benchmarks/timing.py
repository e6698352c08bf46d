"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, which puts this folder on the
import path)."""
import time
from collections.abc import Callable


def time_steps(step: Callable[[], None], steps: int) -> float:
    """Mean wall-clock seconds of ``steps`` calls of ``step``."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps
