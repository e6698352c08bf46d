"""Normalisation on the device, the prefetcher, worker thread caps and kept validation loaders."""
import gc
import os

import cv2
import pytest
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.config import load_config
from mtvision.data.collate import COLLATE_FNS, collate_fn_for
from mtvision.data.datasets import ImagesOf, SkipBadSamples, UnlabeledImageFolder
from mtvision.data.loader import build_loader
from mtvision.data.prefetch import DevicePrefetcher, Normalization, defer_normalization, move_to, to_device
from mtvision.engine import evaluator
from mtvision.tasks import Task, build_tasks

CONTRASTIVE = 'configs/_base_/datasets/synthetic_contrastive_64px.py'
NORMALIZE = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))]


def _batch_at_seed(dataset, collate, seed: int, size: int = 3) -> dict:
    torch.manual_seed(seed)
    return collate([dataset[index] for index in range(size)])


def _assert_deferred_matches(dataset, collate):
    """The deferred pipeline, normalised afterwards, gives the batch the whole pipeline gives at the same seed."""
    deferred, normalization = defer_normalization(dataset)
    assert normalization is not None and deferred is not dataset
    expected = _batch_at_seed(dataset, collate, seed=5)
    host = _batch_at_seed(deferred, collate, seed=5)
    assert host['images'].dtype == torch.uint8  # a quarter of the bytes between processes
    moved = to_device(host, torch.device('cpu'), normalization)
    assert (moved['images'] - expected['images']).abs().max() < 1e-5
    return expected, moved


def test_every_quickstart_task_normalised_after_the_copy_equals_the_worker_pipeline(tiny_config):
    tasks = build_tasks(tiny_config().tasks)
    for task in tasks.values():
        for dataset, split in ((task.train_dataset, 'train'), (task.val_dataset, 'val')):
            expected, moved = _assert_deferred_matches(dataset, collate_fn_for(task, split))
            if task.type != 'detection':
                assert torch.equal(moved['targets'], expected['targets'])
        # the dataset itself still gives normalised images (probes and tools read it directly)
        assert task.train_dataset[0][0].is_floating_point()


def test_two_view_pipelines_and_wrappers_are_looked_through(tiny_data):
    cfg = load_config(CONTRASTIVE)
    views = cfg._contrastive_task['train_dataset']['pipeline']
    folder = tiny_data / 'classification' / 'train'
    _assert_deferred_matches(UnlabeledImageFolder(folder, views), COLLATE_FNS['contrastive'])
    crop = [dict(type='RandomResizedCrop', size=24)]
    asymmetric = [dict(type='MultiView', pipelines=[crop + NORMALIZE, crop + [dict(type='RandomGrayscale', p=1.0)]
                                                    + NORMALIZE])]
    _assert_deferred_matches(UnlabeledImageFolder(folder, asymmetric), COLLATE_FNS['contrastive'])
    labeled = UnlabeledImageFolder(folder, crop + NORMALIZE)
    _assert_deferred_matches(ImagesOf(labeled), COLLATE_FNS['mae'])
    _assert_deferred_matches(SkipBadSamples(labeled), COLLATE_FNS['mae'])
    # stopped early or not ending with the two steps: nothing deferred, the images come as the pipeline makes them
    for pipeline in (crop, crop + NORMALIZE[:1], NORMALIZE + crop,
                     [dict(type='MultiView', pipelines=[crop + NORMALIZE, crop])]):
        dataset = UnlabeledImageFolder(folder, pipeline)
        assert defer_normalization(dataset) == (dataset, None)


def test_mae_targets_are_the_images_copied_once_and_normalised_once():
    host = COLLATE_FNS['mae']([(tv_tensors.Image(torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)), None)] * 2)
    assert host['targets'] is host['images']
    moved = to_device(host, torch.device('cpu'), Normalization((0.5,) * 3, (0.5,) * 3))
    assert moved['targets'] is moved['images']
    assert torch.allclose(moved['images'], host['images'].float() / 255 * 2 - 1)
    nested = move_to(dict(a=host['images'], b=[host['images'], dict(c=host['images'])]), torch.device('cpu'))
    assert nested['b'][0] is nested['a'] and nested['b'][1]['c'] is nested['a']
    with pytest.raises(TypeError, match='ToFloat and Normalize'):
        to_device(host, torch.device('cpu'))  # uint8 without the statistics: the model would get raw pixels


def test_prefetcher_gives_each_host_batch_with_its_device_batch_and_ends_with_the_loader():
    normalization = Normalization((0.0,) * 3, (1.0,) * 3)
    batches = [dict(images=torch.full((2, 3, 2, 2), value, dtype=torch.uint8), targets=torch.tensor([value, 0]))
               for value in (0, 51, 255)]
    pairs = list(DevicePrefetcher(batches, 'cpu', normalization))
    assert [host is batch for (host, _), batch in zip(pairs, batches)] == [True] * 3
    assert [float(device_batch['images'].max()) for _, device_batch in pairs] == pytest.approx([0.0, 0.2, 1.0])
    device_only = DevicePrefetcher(batches, 'cpu', normalization, with_host=False)
    assert len(device_only) == 3 and [b['targets'].tolist() for b in device_only] == [[0, 0], [51, 0], [255, 0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the side-stream copy needs a CUDA device')
def test_side_stream_prefetch_gives_the_synchronous_values():
    generator = torch.Generator().manual_seed(0)
    batches = [dict(images=torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=generator).pin_memory(),
                    targets=torch.arange(8).pin_memory()) for _ in range(6)]
    normalization = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    device = torch.device('cuda')
    for (host, streamed), batch in zip(DevicePrefetcher(batches, device, normalization, run_ahead=True), batches):
        # work on the current stream right away, as the trainer does, while the next copy is in flight
        streamed_sum = (streamed['images'] * 2).sum(dim=(1, 2, 3))
        synchronous = to_device(batch, device, normalization)
        assert host is batch
        torch.testing.assert_close(streamed_sum, (synchronous['images'] * 2).sum(dim=(1, 2, 3)))
        assert torch.equal(streamed['targets'].cpu(), batch['targets'])


class ThreadCounts(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        return torch.tensor([cv2.getNumThreads(), torch.get_num_threads(), int(os.environ['OMP_NUM_THREADS']),
                             os.getpid()], dtype=torch.float64)  # float: batch images

def test_loader_workers_run_opencv_torch_and_openmp_on_one_thread():
    loader, normalization = build_loader(ThreadCounts(), batch_size=2, num_workers=1)
    assert normalization is None and loader.persistent_workers and not loader.pin_memory
    (counts,) = list(loader)
    assert counts[:, :3].tolist() == [[1, 1, 1]] * 2 and int(counts[0, 3]) != os.getpid()


def test_validation_loaders_and_their_workers_are_kept_between_evaluations(monkeypatch):
    # images are the thread counts and the worker's pid here: stacked as they are, with dummy labels
    monkeypatch.setattr(evaluator, 'collate_fn_for', lambda task, split: lambda samples: dict(
        images=torch.stack(samples), targets=torch.zeros(len(samples))))
    dataset = ThreadCounts()
    task = Task(name='cls', type='classification', head={}, train_dataset=None, val_dataset=dataset, batch_size=2,
                val_batch_size=2, num_workers=1)
    kept = len(evaluator._VAL_LOADERS)
    first, second = ([batch['images'][:, 3].tolist() for batch in evaluator.val_loader(task, shard=False)]
                     for _ in range(2))
    assert first == second and first[0][0] != os.getpid()  # the same worker process both times
    assert len(evaluator._VAL_LOADERS) == kept + 1
    del task, dataset
    gc.collect()
    assert len(evaluator._VAL_LOADERS) == kept  # gone with its dataset


def test_workers_forked_after_opencv_ran_its_thread_pool_start():
    # a parent whose OpenCV pool is running: capping the threads in the forked worker must not wait for it
    image = torch.randint(0, 256, (1200, 1200, 3), dtype=torch.uint8).numpy()
    for _ in range(3):
        cv2.GaussianBlur(image, (23, 23), 3)
    loader, _ = build_loader(ThreadCounts(), batch_size=2, num_workers=1, timeout=60)
    assert next(iter(loader))[:, 0].tolist() == [1, 1]
