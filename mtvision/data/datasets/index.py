"""Dataset indexes held in a few numpy arrays rather than millions of Python objects.

A DataLoader worker is a forked copy of the main process. Reading a Python object writes its reference count, so
every page of a list of ``(Path, label)`` tuples that a worker reads becomes that worker's own copy, and the cyclic
garbage collector, walking every tracked container, copies the rest: at ImageNet's 1.28M images about 0.3 GB per
worker (PyTorch issue 13246; detectron2 serialises its dataset dicts into one buffer for the same reason). A numpy
array is one object whatever its length: its pages are only read, and stay shared.
"""
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ['PathArray', 'SampleTable']


class PathArray(Sequence):
    """A read-only sequence of paths, stored as their encoded bytes in one buffer with start offsets.

    ``paths[i]`` is a :class:`~pathlib.Path` made when read. Pickles as two arrays (spawned workers, too).
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        encoded = [os.fsencode(path) for path in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=self._offsets[1:])
        self._bytes = np.frombuffer(b''.join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Path:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]  # negative indices, and IndexError past the end (ends iteration)
        start, end = self._offsets[index], self._offsets[index + 1]
        return Path(os.fsdecode(self._bytes[start:end].tobytes()))

    def __repr__(self) -> str:
        return f'PathArray({len(self)} paths)'

    @property
    def nbytes(self) -> int:
        return self._bytes.nbytes + self._offsets.nbytes


class SampleTable(Sequence):
    """Rows of equal-length columns (:class:`PathArray` or integer arrays), read as tuples: ``table[i]`` is e.g.
    ``(Path, label)`` with the label a Python int, as the list of tuples it replaces gave."""

    def __init__(self, *columns: PathArray | np.ndarray):
        if len({len(column) for column in columns}) > 1:
            raise ValueError(f'columns of one table must have one length, got {[len(column) for column in columns]}')
        self.columns = columns

    @classmethod
    def from_rows(cls, rows: Sequence[tuple], width: int) -> 'SampleTable':
        """A table of ``rows`` of ``width`` values each; a column of ints becomes an int64 array, any other one a
        :class:`PathArray`."""
        columns = list(zip(*rows)) if rows else [()] * width
        return cls(*(np.asarray(column, dtype=np.int64) if column and isinstance(column[0], (int, np.integer))
                     else PathArray(column) for column in columns))

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def __getitem__(self, index: int) -> tuple:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]
        return tuple(int(column[index]) if isinstance(column, np.ndarray) else column[index]
                     for column in self.columns)

    def __repr__(self) -> str:
        return f'SampleTable({len(self)} rows x {len(self.columns)} columns)'

    @property
    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns)
