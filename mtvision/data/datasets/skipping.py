"""A dataset wrapper that replaces unreadable samples by the next readable one, counting what it skipped."""
import logging
import multiprocessing

from torch.utils.data import Dataset

from mtvision.data.errors import DataError

__all__ = ['SkipBadSamples']

logger = logging.getLogger(__name__)

# Shared counters made in the spawn context work with every DataLoader start method: forked workers inherit them,
# spawned (and forkserver) workers receive them while they start. A lock made in the fork context cannot be sent
# to a spawned process.
_CONTEXT = multiprocessing.get_context('spawn')


class SkipBadSamples(Dataset):
    """``dataset[i]``, or when reading it raises :class:`~mtvision.data.errors.DataError`, the next readable
    sample ``i + 1, i + 2, ...`` (modulo ``len(dataset)``).

    Batch sizes stay fixed and the order stays deterministic: which sample replaces a bad one depends on the index
    alone, not on timing or on the worker that reads it. Each bad sample is logged once (its path and index, as
    the DataError names them) over the process and its DataLoader workers; the counts live in shared memory, so
    the main process reads them while the workers (forked or spawned) do the reading. Under torchrun each rank
    counts its own reads. Errors other than DataError propagate: they are bugs, not bad data. Attributes other
    than these are read from the wrapped dataset (``classes``, ``num_classes``, ...).

    The shared counters can only travel to a process as it starts (a DataLoader worker), not through ``pickle``
    in general.

    Args:
        dataset: the dataset to read from (its pipeline included).

    Raises:
        DataError: from ``__getitem__`` when every sample of the dataset is unreadable.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._lock = _CONTEXT.Lock()
        self._skips = _CONTEXT.RawValue('q', 0)
        self._bad = _CONTEXT.RawValue('q', 0)
        # per sample: how many times it was skipped; its first skip is the one that logs
        self._skips_per_sample = _CONTEXT.RawArray('i', len(dataset))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        size = len(self.dataset)
        if not 0 <= index < size:
            raise IndexError(f'index {index} is out of range for a dataset of {size} samples')
        last = None
        for offset in range(size):
            candidate = (index + offset) % size
            try:
                return self.dataset[candidate]
            except DataError as error:
                self._record(candidate, error)
                last = error
        raise DataError(f'every one of the {size} samples of {type(self.dataset).__name__} is unreadable (tried '
                        f'all, starting at this index); the last error: {last}', None, index)

    def _record(self, index: int, error: DataError) -> None:
        with self._lock:
            self._skips.value += 1
            self._skips_per_sample[index] += 1
            first = self._skips_per_sample[index] == 1
            if first:
                self._bad.value += 1
        if first:
            logger.warning('skipping unreadable sample %d: %s', index, error)

    @property
    def skipped(self) -> int:
        """How many reads failed and were replaced by a later sample, in this process and its workers."""
        with self._lock:
            return self._skips.value

    @property
    def num_bad(self) -> int:
        """How many distinct samples were found unreadable, in this process and its workers."""
        with self._lock:
            return self._bad.value

    def bad_indices(self) -> list[int]:
        """Indices of the samples found unreadable so far, ascending."""
        with self._lock:
            return [index for index, skips in enumerate(self._skips_per_sample) if skips]

    def __getattr__(self, name: str):
        # only called for names not found normally; 'dataset' itself is excluded, or unpickling (which looks up
        # attributes before __dict__ is filled) would recurse forever
        if name == 'dataset' or name.startswith('__'):
            raise AttributeError(name)
        return getattr(self.dataset, name)
