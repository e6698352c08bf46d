"""An endless, seeded, position-addressable sampler.

Training is iteration-based, so each task's loader draws from an endless stream of indices: epoch ``e`` is the
permutation of ``torch.randperm(n)`` seeded with ``seed + e``. The stream is addressed by position, so resuming
jumps straight to the sample the interrupted run would have drawn next, without iterating over the skipped ones
(mmengine's Runner replays them; DINOv2's ``sampler_advance`` is the same idea as here).
"""
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteSampler(Sampler[int]):
    """Yields dataset indices forever, starting at stream position ``start``.

    With ``world_size > 1`` the ranks take interleaved positions of one global stream, so together they see each
    epoch once and no two ranks draw the same sample at the same position.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if size <= 0:
            raise ValueError(f'cannot sample from an empty dataset (size={size})')
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        global_position = self.start * self.world_size + self.rank
        epoch, offset = divmod(global_position, self.size)
        order = self._epoch_order(epoch)
        while True:
            yield int(order[offset])
            offset += self.world_size
            while offset >= self.size:
                epoch, offset = epoch + 1, offset - self.size
                order = self._epoch_order(epoch)
