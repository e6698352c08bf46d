"""DataLoaders as the trainer, the evaluator and the probes build them.

Every worker runs its transforms on one thread (:func:`limit_worker_threads`): ``num_workers`` processes already
occupy the cores, and OpenCV's or OpenMP's own pools in each of them would oversubscribe the machine (mmcv and
detectron2 turn OpenCV's threads off in workers for the same reason). On CUDA, batches come in pinned memory, so
that :class:`~mtvision.data.prefetch.DevicePrefetcher` copies them asynchronously; images stay uint8 until the device
(:func:`~mtvision.data.prefetch.defer_normalization`).
"""
import os

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from mtvision.data.prefetch import Normalization, defer_normalization

__all__ = ['build_loader', 'limit_worker_threads']


def limit_worker_threads(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of every DataLoader: OpenCV, torch and OpenMP on one thread in this worker process.

    ``OMP_NUM_THREADS`` is read when an OpenMP runtime starts, so setting it here reaches only runtimes started
    later (libraries loaded by the transforms, processes the worker starts); the runtimes already running are
    capped through their own calls (``cv2.setNumThreads``, ``torch.set_num_threads``).
    """
    os.environ['OMP_NUM_THREADS'] = '1'
    # 0 rather than 1: OpenCV then runs serially without resizing its pool, whereas setNumThreads(1) in a forked
    # worker joins the pool threads the parent had started, which do not exist here, and hangs
    cv2.setNumThreads(0)
    cv2.ocl.setUseOpenCL(False)  # an OpenCL context per worker costs memory and start-up time, for no gain here
    torch.set_num_threads(1)


def build_loader(dataset: Dataset, device: torch.device | str = 'cpu', *, batch_size: int, num_workers: int = 0,
                 **kwargs) -> tuple[DataLoader, Normalization | None]:
    """A DataLoader of ``dataset`` whose images stay uint8 when its pipeline ends with ``ToFloat`` + ``Normalize``,
    and the :class:`~mtvision.data.prefetch.Normalization` to apply on the device (None: images come as the pipeline
    makes them). Workers are capped to one thread and kept between epochs and evaluations (``persistent_workers``);
    on CUDA batches are pinned. ``kwargs`` go to the DataLoader (sampler, collate_fn, drop_last, generator...).
    """
    dataset, normalization = defer_normalization(dataset)
    options = dict(num_workers=num_workers, persistent_workers=num_workers > 0, worker_init_fn=limit_worker_threads,
                   pin_memory=torch.device(device).type == 'cuda')
    return DataLoader(dataset, batch_size=batch_size, **(options | kwargs)), normalization
