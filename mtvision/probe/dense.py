"""Linear segmentation and depth probes on the frozen patch features of a backbone.

The head is DINOv2's linear segmentation head (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features without
Supervision"; ``BNHead`` in dinov2/eval/segmentation/models/decode_heads/linear_head.py, "linear" setting):
BatchNorm over the channels of the last block's patch-feature map, then a 1x1 convolution, whose output is
bilinearly upsampled to the label size. Unlike DINOv2, the BatchNorm normalises with the statistics of the whole
training set rather than of each batch (see :class:`LinearDenseHead`). Segmentation trains it with cross-entropy
(ignore index 255) against class ids; depth uses the same head with one output channel read as the natural log
of the depth, trained with the scale-invariant log loss of :func:`mtvision.models.heads.depth.silog_loss`.
DINOv2's own linear depth head (class token concatenated to the patch tokens, 256 depth bins) is not used: one
log-depth channel keeps both probes the same linear map and matches mtvision's depth head.

The backbone is frozen, so the feature maps of every training and validation image are extracted once, without
augmentation, and held in memory (``float16`` by default, half of the float32 size; the targets stay at label
resolution, class ids as ``uint8`` where they fit). Every epoch then costs only the head's forward and backward
passes. The price is the augmentation DINOv2's protocol applies on the fly (random resized crops and flips): the
probe sees each training image in one view. Keep the sets small enough for memory: the maps take
``N * D * h * w * 2`` bytes, e.g. 2,000 images of a ViT-B/16 at 224 px take 2000 * 768 * 14 * 14 * 2 = 0.6 GB.

Metrics are mtvision's own: :class:`~mtvision.evaluation.SegmentationMetric` (mIoU, mAcc, aAcc) and
:class:`~mtvision.evaluation.DepthMetric` (AbsRel, SqRel, RMSE, RMSE-log, log10, SILog, delta1/2/3), at the
resolution of the validation pipeline's labels.
"""
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mtvision.data.collate import COLLATE_FNS
from mtvision.data.loader import limit_worker_threads
from mtvision.evaluation import DepthMetric, SegmentationMetric
from mtvision.models.heads.depth import silog_loss
from mtvision.optim.optimizer import param_groups, scheduled_lr

__all__ = ['TASK_TYPES', 'DenseFeatures', 'LinearDenseHead', 'extract_dense_features', 'fit_dense_head',
           'evaluate_dense_head', 'train_dense_probe']

logger = logging.getLogger(__name__)

TASK_TYPES = ('segmentation', 'depth')
OPTIMIZER = 'AdamW'


@dataclass
class DenseFeatures:
    """Patch-feature maps of a dataset and its dense targets, in dataset order.

    ``maps``: ``[N, D, h, w]`` (float16 or float32) of the backbone's deepest map; ``targets``: segmentation class
    ids ``[N, H, W]`` (uint8 or int64) or depth in metres ``[N, 1, H, W]`` float32, 0 = invalid.
    """
    maps: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return len(self.maps)


class LinearDenseHead(nn.Module):
    """BatchNorm + 1x1 convolution on a feature map, upsampled bilinearly to the target size (DINOv2's ``BNHead``).

    :func:`fit_dense_head` sets the BatchNorm's statistics to those of the whole cached training set and trains in
    eval mode, so training and evaluation apply the same linear map; DINOv2 trains on batch statistics, which vary
    from batch to batch and keep even perfectly informative features from being fitted exactly. The convolution
    starts as in mmseg (normal, std 0.01; zero bias).

    Args:
        in_channels: channels ``D`` of the feature map.
        out_channels: number of classes, or 1 for log-depth.
        generator: random source of the convolution's initial weights.
    """

    def __init__(self, in_channels: int, out_channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feature_map: Tensor, size: tuple[int, int]) -> Tensor:
        """Outputs ``[B, out_channels, *size]`` (class logits or log-depth) from ``feature_map`` ``[B, D, h, w]``."""
        outputs = self.conv(self.norm(feature_map.float()))
        return F.interpolate(outputs, size=size, mode='bilinear', align_corners=False)


def _default_device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


@torch.no_grad()
def extract_dense_features(backbone: nn.Module, dataset: Dataset, task: str, batch_size: int = 16,
                           num_workers: int = 0, device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float16, progress: bool = True) -> DenseFeatures:
    """Run the frozen ``backbone`` (in eval mode) over ``dataset`` once and keep its deepest feature map.

    ``task`` picks the collate function and target format (``'segmentation'`` or ``'depth'``). The outputs are
    allocated once from the first batch's shapes, so peak memory is the final size, not twice it.
    """
    _check_task(task)
    device = torch.device(device) if device is not None else _default_device()
    backbone.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=COLLATE_FNS[task], worker_init_fn=limit_worker_threads)
    maps = targets = None
    start = 0
    for batch in tqdm(loader, desc=f'{task} features', disable=not progress):
        feature_map = backbone(batch['images'].to(device)).maps[-1]
        target = batch['targets']
        if maps is None:
            maps = torch.empty((len(dataset), *feature_map.shape[1:]), dtype=dtype)
            targets = torch.empty((len(dataset), *target.shape[1:]), dtype=_target_dtype(task, target))
            logger.info('%s features: %d x %s maps in %s, %.2f GB', task, len(dataset), list(feature_map.shape[1:]),
                        dtype, maps.nbytes / 1e9)
        if targets.dtype == torch.uint8 and _target_dtype(task, target) != torch.uint8:
            targets = targets.long()
        stop = start + len(feature_map)
        maps[start:stop] = feature_map.to('cpu', dtype)
        targets[start:stop] = target
        start = stop
    if maps is None:
        raise ValueError(f'{task} dataset is empty')
    return DenseFeatures(maps, targets)


def _check_task(task: str) -> None:
    if task not in TASK_TYPES:
        raise ValueError(f'task must be one of {TASK_TYPES}, got {task!r}')


def _target_dtype(task: str, target: Tensor) -> torch.dtype:
    if task == 'depth':
        return torch.float32
    # class ids and the usual ignore index 255 fit in a byte, an eighth of int64
    fits_byte = bool(((target >= 0) & (target <= 255)).all())
    return torch.uint8 if fits_byte else torch.int64


@torch.no_grad()
def _channel_statistics(maps: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance per channel of ``[N, D, h, w]`` maps, summed in float64 a chunk at a time."""
    total = torch.zeros(maps.shape[1], dtype=torch.float64)
    total_squares = torch.zeros_like(total)
    for part in maps.split(chunk):
        part = part.double()
        total += part.sum(dim=(0, 2, 3))
        total_squares += part.square().sum(dim=(0, 2, 3))
    count = maps.numel() // maps.shape[1]
    mean = total / count
    return mean.float(), (total_squares / count - mean.square()).clamp(min=0).float()


def _loss(task: str, outputs: Tensor, targets: Tensor, ignore_index: int, min_depth: float) -> Tensor:
    if task == 'segmentation':
        return F.cross_entropy(outputs, targets.long(), ignore_index=ignore_index)
    return silog_loss(outputs, targets, min_depth)


def fit_dense_head(head: LinearDenseHead, train: DenseFeatures, task: str, epochs: int = 10, batch_size: int = 16,
                   lr: float = 1e-3, weight_decay: float = 1e-4, ignore_index: int = 255, min_depth: float = 1e-3,
                   seed: int = 0, device: torch.device | str | None = None, progress: bool = True) -> list[float]:
    """Train ``head`` in place on cached features; returns the mean training loss of every epoch.

    The BatchNorm normalises with the mean and variance of all training features (set here, then fixed) and learns
    its affine part. AdamW (no decay on the norm and biases) under a cosine learning-rate decay to 0 over all
    iterations, without warm-up, as the head starts near zero output. Batches are drawn in a seeded random order.
    """
    _check_task(task)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f'epochs and batch_size must be positive, got {epochs} and {batch_size}')
    device = torch.device(device) if device is not None else _default_device()
    mean, variance = _channel_statistics(train.maps)
    head.norm.running_mean.copy_(mean)
    head.norm.running_var.copy_(variance)
    head.eval().to(device)
    optimizer = torch.optim.AdamW(param_groups(head, weight_decay), lr=lr)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = [dict(type='CosineAnnealingLR', begin=0, end=epochs * steps_per_epoch)]
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    step = 0
    for _ in tqdm(range(epochs), desc=f'{task} probe', disable=not progress):
        total, count = 0.0, 0
        for indices in torch.randperm(len(train), generator=generator).split(batch_size):
            for group in optimizer.param_groups:
                group['lr'] = scheduled_lr(lr, step, schedule)
            targets = train.targets[indices].to(device)
            outputs = head(train.maps[indices].to(device), targets.shape[-2:])
            loss = _loss(task, outputs, targets, ignore_index, min_depth)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(indices)
            count += len(indices)
            step += 1
        epoch_losses.append(total / count)
    return epoch_losses


@torch.no_grad()
def evaluate_dense_head(head: LinearDenseHead, val: DenseFeatures, task: str, num_classes: int | None = None,
                        batch_size: int = 16, ignore_index: int = 255, min_depth: float = 1e-3,
                        max_depth: float | None = None, device: torch.device | str | None = None) -> dict[str, float]:
    """Metrics of ``head`` on cached validation features: mIoU, mAcc, aAcc (percent) or DepthMetric's set.

    Depth predictions are ``exp(log-depth)`` clamped to ``[min_depth, max_depth]`` (no upper bound when None).
    """
    _check_task(task)
    if task == 'segmentation':
        if num_classes is None:
            raise ValueError('segmentation needs num_classes')
        metric = SegmentationMetric(num_classes, ignore_index=ignore_index)
    else:
        metric = DepthMetric(min_depth=min_depth, max_depth=max_depth)
    device = torch.device(device) if device is not None else _default_device()
    head.eval().to(device)
    for start in range(0, len(val), batch_size):
        targets = val.targets[start:start + batch_size].to(device)
        outputs = head(val.maps[start:start + batch_size].to(device), targets.shape[-2:])
        if task == 'segmentation':
            metric.update(outputs.argmax(dim=1), targets.long())
        else:
            metric.update(outputs.exp().clamp(min_depth, max_depth), targets)
    return metric.compute()


def train_dense_probe(backbone: nn.Module, task: str, train_dataset: Dataset, val_dataset: Dataset,
                      num_classes: int | None = None, epochs: int = 10, batch_size: int = 16, lr: float = 1e-3,
                      weight_decay: float = 1e-4, ignore_index: int = 255, min_depth: float = 1e-3,
                      max_depth: float | None = None, head: LinearDenseHead | None = None, seed: int = 0,
                      num_workers: int = 0, device: torch.device | str | None = None,
                      feature_dtype: torch.dtype = torch.float16, progress: bool = True) -> dict[str, float]:
    """Extract the frozen features of both sets once, train a linear head on the training set, evaluate it.

    Args:
        backbone: returns :class:`~mtvision.models.backbones.base.BackboneOutput`; its deepest map is probed.
        task: ``'segmentation'`` or ``'depth'``.
        train_dataset, val_dataset: mtvision segmentation / depth datasets (or any with their sample format),
            with pipelines that produce images of the backbone's input size.
        num_classes: segmentation classes; default ``train_dataset.num_classes``. Ignored for depth.
        epochs, batch_size, lr, weight_decay: the head's schedule (see :func:`fit_dense_head`); ``batch_size``
            also batches the feature extraction.
        ignore_index: segmentation label left out of loss and metric.
        min_depth, max_depth: depth validity and prediction clamp range in metres (no upper bound when None).
        head: a head to train in place, to keep it afterwards; default a new :class:`LinearDenseHead` seeded by
            ``seed``.
        seed: seeds the head's initialisation and the batch order.
        feature_dtype: storage type of the cached maps.

    Returns:
        The validation metrics of :func:`evaluate_dense_head`.
    """
    _check_task(task)
    if task == 'segmentation':
        num_classes = num_classes if num_classes is not None else getattr(train_dataset, 'num_classes', None)
        if num_classes is None:
            raise ValueError('segmentation needs num_classes (the training dataset has no num_classes attribute)')
    device = torch.device(device) if device is not None else _default_device()
    extract = dict(task=task, batch_size=batch_size, num_workers=num_workers, device=device, dtype=feature_dtype,
                   progress=progress)
    train = extract_dense_features(backbone, train_dataset, **extract)
    val = extract_dense_features(backbone, val_dataset, **extract)
    if head is None:
        out_channels = num_classes if task == 'segmentation' else 1
        head = LinearDenseHead(train.maps.shape[1], out_channels, torch.Generator().manual_seed(seed))
    epoch_losses = fit_dense_head(head, train, task, epochs=epochs, batch_size=batch_size, lr=lr,
                                  weight_decay=weight_decay, ignore_index=ignore_index, min_depth=min_depth,
                                  seed=seed, device=device, progress=progress)
    logger.info('%s probe: training loss %.4g after the first epoch, %.4g after the last', task, epoch_losses[0],
                epoch_losses[-1])
    return evaluate_dense_head(head, val, task, num_classes=num_classes, batch_size=batch_size,
                               ignore_index=ignore_index, min_depth=min_depth, max_depth=max_depth, device=device)
