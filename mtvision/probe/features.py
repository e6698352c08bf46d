"""Frozen-backbone features for probes: extraction (single process or distributed), an on-disk cache, and kNN.

A :class:`FeatureSet` holds, per image, the class token of each of the last ``n_blocks`` blocks and the mean of the
last block's patch tokens, all after the final norm (DINOv2's ``get_intermediate_layers(norm=True)``). From these
:meth:`FeatureSet.select` builds every feature of DINOv2's linear-probe grid, so one extraction serves kNN and all
linear probes.
"""
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from mtvision.data.collate import collate_classification
from mtvision.data.loader import limit_worker_threads
from mtvision.data.datasets.imagefolder import ImageFolderDataset
from mtvision.distributed import collective_device, rank_and_world
from mtvision.checkpoint import fsync_write, write_text_atomic
from mtvision.models.backbones import ViT

__all__ = ['FEATURE_NAMES', 'FeatureSet', 'cached_features', 'eval_pipeline', 'extract_features',
           'image_folder_splits', 'knn_classify', 'probe_datasets']

logger = logging.getLogger(__name__)

FEATURE_NAMES = ('cls', 'avgpool', 'cls+avgpool', 'last4', 'last4+avgpool')
DEFAULT_N_BLOCKS = 4
_ARRAYS = ('cls_tokens', 'avgpool', 'labels')
_KEY_FILE = 'key.json'
# rows per all_gather call: bounds the extra device memory of gathering a large feature set over NCCL
_GATHER_ROWS = 16384


@dataclass
class FeatureSet:
    """Features of a dataset, in dataset order.

    Attributes:
        cls_tokens: float32 [N, n_blocks, D], the class token after each of the last ``n_blocks`` blocks, last
            block last.
        avgpool: float32 [N, D], the mean of the last block's patch tokens.
        labels: int64 [N].
    """

    cls_tokens: Tensor
    avgpool: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, name: str) -> Tensor:
        """The feature ``name`` (one of :data:`FEATURE_NAMES`) as [N, D']: ``'cls'`` is the last block's class
        token, ``'last4'`` the last 4 class tokens concatenated (oldest first), ``'+avgpool'`` appends ``avgpool``."""
        if name not in FEATURE_NAMES:
            raise ValueError(f'unknown feature {name!r}; choose one of {FEATURE_NAMES}')
        tokens_name, _, pooled = name.partition('+')
        if name == 'avgpool':
            return self.avgpool
        num_tokens = 4 if tokens_name == 'last4' else 1
        if num_tokens > self.cls_tokens.shape[1]:
            raise ValueError(f'feature {name!r} needs the class tokens of {num_tokens} blocks, but these features '
                             f'hold {self.cls_tokens.shape[1]} (extract with n_blocks >= {num_tokens})')
        tokens = self.cls_tokens[:, -num_tokens:].flatten(1)
        return torch.cat([tokens, self.avgpool], dim=1) if pooled else tokens


def _gather_interleaved(local: Tensor, total: int) -> Tensor:
    """Reassemble a tensor whose rows rank r holds at dataset indices r, r + world, ... into dataset order."""
    _, world = rank_and_world()
    device = collective_device()
    shard_rows = -(-total // world)
    gathered = []
    for start in range(0, shard_rows, _GATHER_ROWS):
        stop = min(start + _GATHER_ROWS, shard_rows)
        # all_gather needs equal shapes; ranks with one row fewer pad, and the padding lands past `total` below
        padded = torch.zeros((stop - start, *local.shape[1:]), dtype=local.dtype, device=device)
        part = local[start:stop]
        padded[:len(part)] = part.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        # row j of rank r is dataset index j * world + r
        gathered.append(torch.stack(parts, dim=1).flatten(0, 1).cpu())
    return torch.cat(gathered)[:total] if gathered else local


def _forward_tokens(backbone: ViT, images: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    final, intermediates = backbone.model.forward_intermediates(
        images, indices=n_blocks, return_prefix_tokens=True, norm=True, output_fmt='NLC')
    cls_tokens = torch.stack([prefix_tokens[:, 0] for _, prefix_tokens in intermediates], dim=1)
    avgpool = final[:, backbone.num_prefix_tokens:].mean(dim=1)
    return cls_tokens.float(), avgpool.float()


@torch.no_grad()
def extract_features(backbone: ViT, dataset: Dataset, n_blocks: int = DEFAULT_N_BLOCKS, batch_size: int = 64,
                     num_workers: int = 0, device: torch.device | str | None = None,
                     progress: bool = True) -> FeatureSet:
    """Run ``backbone`` over a classification ``dataset`` (``(image, label)`` samples) in order, in eval mode.

    Under ``torch.distributed``, rank r extracts the indices r, r + world, ... and every rank receives the whole
    set in dataset order.

    Args:
        backbone: a :class:`~mtvision.models.backbones.ViT` with a class token.
        dataset: samples of one image size (the pipeline must resize or crop).
        n_blocks: how many of the last blocks' class tokens to keep.
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        device: where to run; the backbone is moved there. Default: where the backbone is.
        progress: show a progress bar (on rank 0).
    """
    depth = len(backbone.model.blocks)
    if not 1 <= n_blocks <= depth:
        raise ValueError(f'n_blocks must be in [1, {depth}] for a backbone of depth {depth}, got {n_blocks}')
    if not backbone.has_cls_token:
        raise ValueError(f'{backbone.model.__class__.__name__} has no class token; class-token features need one')
    if device is not None:
        backbone.to(device)
    parameter = next(backbone.parameters())
    rank, world = rank_and_world()
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_classification, pin_memory=parameter.device.type == 'cuda',
                        worker_init_fn=limit_worker_threads)
    cls_parts = [torch.empty(0, n_blocks, backbone.embed_dim)]
    avgpool_parts = [torch.empty(0, backbone.embed_dim)]
    label_parts = [torch.empty(0, dtype=torch.int64)]
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in tqdm(loader, desc='extracting features', unit='batch', disable=not progress or rank != 0):
            images = batch['images'].to(parameter.device, parameter.dtype, non_blocking=True)
            cls_tokens, avgpool = _forward_tokens(backbone, images, n_blocks)
            cls_parts.append(cls_tokens.cpu())
            avgpool_parts.append(avgpool.cpu())
            label_parts.append(batch['targets'])
    finally:
        backbone.train(was_training)
    features = FeatureSet(torch.cat(cls_parts), torch.cat(avgpool_parts), torch.cat(label_parts))
    if world > 1:
        features = FeatureSet(*(_gather_interleaved(getattr(features, name), len(dataset)) for name in _ARRAYS))
    return features


def _save_array_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    fsync_write(tmp, lambda f: np.save(f, array))
    os.replace(tmp, path)


def _load_entry(entry: Path, record: dict) -> FeatureSet | None:
    """The cached features of ``entry``, or None when it is absent, incomplete or does not match ``record``."""
    key_file = entry / _KEY_FILE
    # the key file is written last: without it the arrays may be partial
    if not key_file.is_file():
        return None
    try:
        if json.loads(key_file.read_text()) != record:
            logger.warning('feature cache entry %s holds another key: extracting again', entry)
            return None
        # copy-on-write maps: read lazily from disk, and writable, as torch.from_numpy expects
        arrays = {name: np.load(entry / f'{name}.npy', mmap_mode='c') for name in _ARRAYS}
    except (OSError, ValueError) as error:
        logger.warning('unreadable feature cache entry %s (%s): extracting again', entry, error)
        return None
    if any(len(array) != record['num_samples'] for array in arrays.values()):
        logger.warning('feature cache entry %s does not hold %d samples: extracting again', entry,
                       record['num_samples'])
        return None
    return FeatureSet(**{name: torch.from_numpy(array) for name, array in arrays.items()})


def _on_every_rank(found: bool) -> bool:
    _, world = rank_and_world()
    if world == 1:
        return found
    flag = torch.tensor([int(found)], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def cached_features(backbone: ViT, dataset: Dataset, cache_dir: str | os.PathLike, key: dict,
                    **extract_kwargs) -> FeatureSet:
    """:func:`extract_features`, stored on disk under ``key`` and loaded (memory-mapped) when already there.

    ``key`` is a JSON-able dict that must name everything the features depend on: the model fingerprint (and
    MoE task), the data (path, classes, transform pipeline). ``n_blocks`` and the dataset length are added to it.
    An entry is a folder ``<cache_dir>/<sha256 of the key>/`` of ``.npy`` files and ``key.json``; every file is
    written under a temporary name and renamed, ``key.json`` last, so an interrupted write leaves nothing that
    loads. Under ``torch.distributed`` the entry is used only if every rank can read it, and rank 0 writes it.
    """
    record = dict(key=key, n_blocks=extract_kwargs.get('n_blocks', DEFAULT_N_BLOCKS), num_samples=len(dataset))
    try:
        text = json.dumps(record, sort_keys=True)
    except TypeError as error:
        raise TypeError(f'feature cache key must be JSON-serialisable ({error}): {key!r}') from error
    # compare with the key as it reads back from JSON (tuples become lists)
    record = json.loads(text)
    entry = Path(cache_dir) / hashlib.sha256(text.encode()).hexdigest()
    cached = _load_entry(entry, record)
    if _on_every_rank(cached is not None):
        logger.info('loaded cached features from %s', entry)
        return cached
    features = extract_features(backbone, dataset, **extract_kwargs)
    rank, world = rank_and_world()
    if rank == 0:
        entry.mkdir(parents=True, exist_ok=True)
        # an entry being rewritten must not load while its arrays are a mix of old and new
        (entry / _KEY_FILE).unlink(missing_ok=True)
        for name in _ARRAYS:
            _save_array_atomic(entry / f'{name}.npy', getattr(features, name).numpy())
        write_text_atomic(entry / _KEY_FILE, json.dumps(record, indent=1, sort_keys=True))
        logger.info('cached features in %s', entry)
    if world > 1:
        # else a rank could look the entry up again before rank 0 has written it, and all ranks would extract
        dist.barrier()
    return features


@torch.no_grad()
def knn_classify(train: Tensor, train_labels: Tensor, test: Tensor, num_classes: int,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, Tensor]:
    """Weighted kNN of DINO / DINOv2: class scores [N_test, num_classes] for each ``k`` in ``ks``.

    Features are L2-normalised; each test sample's ``k`` most cosine-similar training samples vote for their class
    with weight ``exp(similarity / temperature)``. A ``k`` larger than the training set is clipped to its size;
    ties in similarity at the k-th neighbour are broken by ``torch.topk``. Runs on ``train``'s device, ``chunk``
    test samples at a time (memory: ``chunk * N_train`` similarities).
    """
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f'train and test features must be [N, D] with the same D, got {tuple(train.shape)} and '
                         f'{tuple(test.shape)}')
    if train_labels.shape != (len(train),):
        raise ValueError(f'train_labels must be [{len(train)}], got {tuple(train_labels.shape)}')
    if len(train) == 0:
        raise ValueError('kNN needs at least one training sample')
    if not ks or min(ks) < 1:
        raise ValueError(f'ks must be positive integers, got {tuple(ks)}')
    if temperature <= 0:
        raise ValueError(f'temperature must be positive, got {temperature}')
    out_of_range = (train_labels < 0) | (train_labels >= num_classes)
    if out_of_range.any():
        index = int(out_of_range.nonzero()[0])
        raise ValueError(f'train label {int(train_labels[index])} at index {index} is outside [0, {num_classes})')
    train = F.normalize(train.float(), dim=1)
    train_labels = train_labels.to(train.device)
    max_k = min(max(ks), len(train))
    scores = {k: [torch.empty(0, num_classes, device=train.device)] for k in ks}
    for start in range(0, len(test), chunk):
        queries = F.normalize(test[start:start + chunk].to(train.device, torch.float32), dim=1)
        similarities, indices = (queries @ train.T).topk(max_k, dim=1)
        weights = (similarities / temperature).exp()
        neighbour_labels = train_labels[indices]
        for k in ks:
            k_used = min(k, max_k)
            votes = weights.new_zeros(len(queries), num_classes)
            scores[k].append(votes.scatter_add_(1, neighbour_labels[:, :k_used], weights[:, :k_used]))
    return {k: torch.cat(parts) for k, parts in scores.items()}


def eval_pipeline(img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875) -> list[dict]:
    """The evaluation transform of timm, DINO and MAE: resize the short side to ``floor(img_size / crop_pct)``
    (bicubic), centre crop ``img_size`` (256 -> 224 at the default), scale to 0..1 and normalise with ``mean`` /
    ``std`` (0..1)."""
    return [dict(type='ResizeCenterCrop', size=img_size, crop_pct=crop_pct, interpolation='bicubic'),
            dict(type='ToFloat'), dict(type='Normalize', mean=list(mean), std=list(std))]


def image_folder_splits(data: str | os.PathLike, val: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The train and val roots of the probe tools' ``--data DIR [--val DIR]``: ``DIR/train`` and ``DIR/val``, or
    ``DIR`` and the ``--val`` folder. The train root holds class folders; the val root too, or the images that
    ``--val-ann-file`` lists."""
    train_root, val_root = (Path(data), Path(val)) if val is not None else (Path(data) / 'train', Path(data) / 'val')
    for role, root in (('train', train_root), ('val', val_root)):
        if not root.is_dir():
            hint = '' if val is not None else ' (--data needs train/ and val/ sub-folders, or pass --val DIR)'
            raise FileNotFoundError(f'{role} folder {str(root)!r} does not exist{hint}')
    return train_root, val_root


def probe_datasets(data: str | os.PathLike, val: str | os.PathLike | None, val_pipeline: list[dict],
                   train_pipeline: list[dict] | None = None, val_ann_file: str | os.PathLike | None = None
                   ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """The train and val :class:`~mtvision.data.ImageFolderDataset` of a classification probe.

    The val set is built on the training set's classes (its class folders, sorted), so its labels index them by
    construction: class folders of the same names, or a label list (``val_ann_file``: mmpretrain's ``val.txt`` of
    class indices, or Kaggle's ``LOC_val_solution.csv`` of wnids, looked up among the training classes; paths
    relative to the val root). A training class without a val folder, or a listed wnid that training lacks,
    is a DataError.
    """
    train_root, val_root = image_folder_splits(data, val)
    train_set = ImageFolderDataset(train_root, val_pipeline if train_pipeline is None else train_pipeline)
    val_set = ImageFolderDataset(val_root, val_pipeline, ann_file=val_ann_file, classes=train_set.classes)
    return train_set, val_set


def classification_features(loaded, data: str | os.PathLike, val: str | os.PathLike | None,
                            cache_dir: str | os.PathLike, task: str | None = None, crop_pct: float = 0.875,
                            val_ann_file: str | os.PathLike | None = None, **extract_kwargs
                            ) -> tuple[dict[str, FeatureSet], list[str]]:
    """Cached features of the train and val splits of an ImageNet-style folder (see :func:`probe_datasets`), as
    every classification probe reads them (one cache entry per split, shared by kNN and the linear sweep), and the
    class names.

    ``loaded`` is a :class:`mtvision.probe.models.LoadedBackbone`; the last ``min(4, depth)`` blocks are kept so
    that one entry serves every name in :data:`FEATURE_NAMES`.
    """
    pipeline = eval_pipeline(loaded.img_size, loaded.mean, loaded.std, crop_pct)
    train_set, val_set = probe_datasets(data, val, pipeline, val_ann_file=val_ann_file)
    n_blocks = min(4, len(loaded.backbone.model.blocks))
    features = {}
    for split, dataset, ann_file in (('train', train_set, None), ('val', val_set, val_ann_file)):
        key = dict(model=loaded.fingerprint, task=task, data=str(dataset.data_root.resolve()),
                   ann_file=None if ann_file is None else str(Path(ann_file).resolve()), classes=train_set.classes,
                   pipeline=pipeline)
        features[split] = cached_features(loaded.backbone, dataset, cache_dir, key, n_blocks=n_blocks,
                                          **extract_kwargs)
    return features, list(train_set.classes)
