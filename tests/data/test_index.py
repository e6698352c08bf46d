"""Dataset indexes in numpy arrays: the same rows as the lists they replace, few Python objects."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from mtvision.data.datasets import UnlabeledImageFolder
from mtvision.data.datasets.index import PathArray, SampleTable
from mtvision.tasks import build_tasks


def test_path_array_reads_back_every_path_including_non_ascii_and_survives_pickle():
    paths = [Path('a/b.jpg'), Path('ünï cödé/ß p.png'), Path(''), Path('/abs/x y.JPEG')]
    array = PathArray(paths)
    assert list(array) == paths and array[-1] == paths[-1] and array[1:3] == paths[1:3]
    with pytest.raises(IndexError):
        array[4]
    assert list(pickle.loads(pickle.dumps(array))) == paths
    assert len(PathArray([])) == 0 and list(PathArray([])) == []


def test_sample_table_rows_are_the_tuples_they_replace():
    rows = [(Path('x/1.png'), 3), (Path('y/2.png'), 0)]
    table = SampleTable.from_rows(rows, width=2)
    assert list(table) == rows and table[1] == (Path('y/2.png'), 0) and type(table[0][1]) is int
    assert isinstance(table.columns[1], np.ndarray) and table.columns[1].dtype == np.int64
    pairs = SampleTable.from_rows([(Path('i.jpg'), Path('l.png'))], width=2)
    assert pairs[0] == (Path('i.jpg'), Path('l.png'))
    assert len(SampleTable.from_rows([], width=2)) == 0
    with pytest.raises(ValueError, match='one length'):
        SampleTable(PathArray(['a']), np.zeros(2, dtype=np.int64))


def test_datasets_hold_their_index_in_arrays(tiny_config):
    tasks = build_tasks(tiny_config().tasks)
    datasets = [task.train_dataset for task in tasks.values() if task.type in ('classification', 'segmentation',
                                                                                 'depth')]
    assert len(datasets) == 3
    for dataset in datasets:
        assert isinstance(dataset.samples, SampleTable) and all(path.is_file() for path in dataset.samples[0]
                                                                if isinstance(path, Path))
        # a pickled index is a handful of arrays, not one object per sample
        text = sum(len(str(value)) for row in dataset.samples for value in row)
        assert len(pickle.dumps(dataset.samples)) < 1000 + text + 8 * 2 * len(dataset)
    classification = datasets[0]
    unlabeled = UnlabeledImageFolder(classification.data_root)
    assert isinstance(unlabeled.samples, PathArray)
    assert sorted(path for path, _ in classification.samples) == list(unlabeled.samples)
    assert [classification.classes[label] for path, label in classification.samples] == [
        path.parent.name for path, _ in classification.samples]
