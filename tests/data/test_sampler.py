import itertools

import pytest
import torch

from mtvision.data.sampler import InfiniteSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = take(InfiniteSampler(7, seed=3), 21)
    epochs = [stream[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert epochs[0] == torch.randperm(7, generator=torch.Generator().manual_seed(3)).tolist()


def test_start_position_continues_the_same_stream():
    full = take(InfiniteSampler(5, seed=1), 23)
    for start in (0, 4, 5, 11):
        assert take(InfiniteSampler(5, seed=1, start=start), 23 - start) == full[start:]


def test_ranks_split_one_global_stream():
    full = take(InfiniteSampler(6, seed=2), 24)
    rank0 = take(InfiniteSampler(6, seed=2, rank=0, world_size=2), 12)
    rank1 = take(InfiniteSampler(6, seed=2, rank=1, world_size=2), 12)
    assert rank0 == full[0::2] and rank1 == full[1::2]
    resumed = take(InfiniteSampler(6, seed=2, rank=1, world_size=2, start=5), 7)
    assert resumed == rank1[5:]


def test_unshuffled_stream_is_in_order():
    assert take(InfiniteSampler(3, shuffle=False), 7) == [0, 1, 2, 0, 1, 2, 0]


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match='empty'):
        InfiniteSampler(0)
