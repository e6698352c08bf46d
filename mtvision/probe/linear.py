"""Linear probes of a frozen backbone: MAE's protocol, and DINOv2's sweep over cached features.

MAE protocol (:func:`train_linear_probe_mae`, MAE ``main_linprobe.py``): features are computed on the fly from
augmented images (RandomResizedCrop + horizontal flip), the head is ``BatchNorm1d(affine=False)`` + ``Linear``
trained with LARS, ``lr = blr * batch / 256``, linear warm-up then cosine decay per iteration, top-1 / top-5 of the
final head on the validation set. MAE's own settings: 90 epochs, batch 16384 (so lr 6.4), blr 0.1, LARS, weight
decay 0, 10 warm-up epochs, the class token. Ours keep all of them except the batch: 256 by default (lr 0.1), what a
CPU holds and steps through at a useful rate.

DINOv2 sweep (:func:`linear_sweep`, DINOv2 ``eval/linear.py``): from cached :class:`FeatureSet` s, one linear head
per (feature, learning rate) pair, all trained together on the same batches (SGD, momentum 0.9, no weight decay,
cosine schedule, ``lr * batch / 256``), the best head chosen on a held-out split. DINOv2 trains 12,500 iterations
of batch 128 on augmented features, not standardised, with 13 rates from 1e-5 to 0.1. Here the features are cached (not
augmented) and, by default, standardised with the training split's mean and deviation, which makes the problem well
conditioned whatever the backbone's feature scale; the default length is :data:`SWEEP_ITERATIONS` iterations
whatever the dataset's size (counting epochs gave 120 iterations on a set of 1,500 images, far from converged),
and the default grid :data:`SWEEP_LRS` extends itself by a decade when the chosen rate sits at one of its ends.
"""
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from mtvision.data.collate import collate_classification
from mtvision.data.loader import limit_worker_threads
from mtvision.distributed import collective_device
from mtvision.evaluation.classification import Accuracy
from mtvision.optim.lars import LARS
from mtvision.optim.optimizer import scheduled_lr
from mtvision.probe.features import FEATURE_NAMES, FeatureSet

__all__ = ['DINOV2_LRS', 'MAE_FEATURES', 'SWEEP_ITERATIONS', 'SWEEP_LRS', 'LinearHeadGrid', 'evaluate_head_grid',
           'feature_statistics', 'linear_sweep', 'split_holdout', 'train_head_grid', 'train_linear_probe_mae']

logger = logging.getLogger(__name__)

# DINOv2's learning-rate grid (eval/linear.py), before scaling by batch / 256
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
# the sweep's default grid: as many rates as DINOv2's, one decade higher, since standardised features (the default)
# put the optimum near 0.01-0.5 (see linear_sweep); a best rate at either end extends the grid
SWEEP_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0)
# the sweep's default length in iterations of batch 128, whatever the dataset's size (see linear_sweep)
SWEEP_ITERATIONS = 1000
# the MAE protocol reads the backbone's last block only (MAE's --cls_token and --global_pool)
MAE_FEATURES = ('cls', 'avgpool')
MAE_OPTIMIZERS = ('lars', 'sgd')


def _default_device(device: torch.device | str | None) -> torch.device:
    return torch.device(device if device is not None else ('cuda' if torch.cuda.is_available() else 'cpu'))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------- MAE protocol

def _mae_features(backbone: nn.Module, images: Tensor, feature: str) -> Tensor:
    with torch.no_grad():
        output = backbone(images)
    if feature == 'cls':
        if output.cls_token is None:
            raise ValueError("feature='cls' needs a backbone with a class token; use feature='avgpool'")
        return output.cls_token.float()
    return output.pooled.float()


@torch.no_grad()
def _evaluate_mae(backbone: nn.Module, head: nn.Module, dataset: Dataset, feature: str, batch_size: int,
                  num_workers: int, device: torch.device) -> dict[str, float]:
    rank, world_size = _world()
    # a strided shard per rank, without the padding DistributedSampler adds, so every image counts exactly once
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    metric = Accuracy(topk=(1, 5))
    head.eval()
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_classification,
                        worker_init_fn=limit_worker_threads)
    for batch in loader:
        metric.update(head(_mae_features(backbone, batch['images'].to(device), feature)),
                      batch['targets'].to(device))
    accuracy = metric.compute() if len(shard) else {'top1': 0.0, 'top5': 0.0}
    if world_size == 1:
        return accuracy
    totals = torch.tensor([accuracy['top1'] * len(shard), accuracy['top5'] * len(shard), len(shard)],
                          dtype=torch.float64, device=collective_device())
    dist.all_reduce(totals)
    return {'top1': float(totals[0] / totals[2]), 'top5': float(totals[1] / totals[2])}


def train_linear_probe_mae(backbone: nn.Module, train_dataset: Dataset, val_dataset: Dataset, num_classes: int,
                           feature: str = 'cls', epochs: int = 90, batch_size: int = 256, blr: float = 0.1,
                           warmup_epochs: int = 10, weight_decay: float = 0.0, optimizer: str = 'lars',
                           num_workers: int = 0, device: torch.device | str | None = None, seed: int = 0,
                           progress: bool = True) -> dict:
    """Train and evaluate a linear probe with MAE's protocol (see the module docstring); returns its results.

    The datasets return ``(image, label)``: ``train_dataset`` with MAE's augmentation in its pipeline, and
    ``val_dataset`` with the resize + centre crop. The backbone is frozen (eval mode, no gradients) and moved to
    ``device``. ``batch_size`` is the total batch; under ``torch.distributed`` each rank draws
    ``batch_size / world_size`` images of it and the head is trained with DistributedDataParallel. ``seed`` fixes
    the head's initialisation and the data order (augmentations draw from the global RNG).

    Returns a dict with ``protocol``, ``feature``, ``epochs``, ``batch_size``, ``optimizer``, ``blr``, ``lr``
    (the scaled rate), ``weight_decay``, ``warmup_epochs``, ``iterations``, ``top1`` and ``top5`` (percent).
    """
    if feature not in MAE_FEATURES:
        raise ValueError(f'feature={feature!r}: the MAE protocol takes one of {MAE_FEATURES}')
    if optimizer not in MAE_OPTIMIZERS:
        raise ValueError(f'optimizer={optimizer!r} is not one of {MAE_OPTIMIZERS}')
    rank, world_size = _world()
    if batch_size % world_size:
        raise ValueError(f'batch_size={batch_size} does not divide among {world_size} processes')
    rank_batch = batch_size // world_size
    # drop_last as MAE: a last batch of one image would break BatchNorm in training
    if len(train_dataset) < batch_size:
        raise ValueError(f'the training set holds {len(train_dataset)} images, fewer than one batch of {batch_size}')
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f'warmup_epochs={warmup_epochs} must lie in [0, epochs={epochs}]')
    device = _default_device(device)
    backbone.eval().requires_grad_(False).to(device)

    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(backbone.embed_dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(backbone.embed_dim, affine=False, eps=1e-6), linear).to(device)
    trained = nn.parallel.DistributedDataParallel(head) if world_size > 1 else head

    lr = blr * batch_size / 256
    if optimizer == 'lars':
        optim = LARS(head.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        optim = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    if world_size > 1:
        sampler = DistributedSampler(train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        loader = DataLoader(train_dataset, batch_size=rank_batch, sampler=sampler, num_workers=num_workers,
                            collate_fn=collate_classification, drop_last=True, worker_init_fn=limit_worker_threads)
    else:
        sampler = None
        loader = DataLoader(train_dataset, batch_size=rank_batch, shuffle=True, generator=generator,
                            num_workers=num_workers, collate_fn=collate_classification, drop_last=True,
                            worker_init_fn=limit_worker_threads)
    iters_per_epoch = len(loader)
    total_iters, warmup_iters = epochs * iters_per_epoch, warmup_epochs * iters_per_epoch
    phases = [dict(type='CosineAnnealingLR', begin=warmup_iters, end=total_iters, eta_min=0.0)]
    if warmup_iters:
        phases.insert(0, dict(type='LinearLR', begin=0, end=warmup_iters, start_factor=0.0, end_factor=1.0))

    step = 0
    bar = tqdm(total=total_iters, desc=f'linear probe ({feature})', disable=not progress or rank != 0)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        trained.train()
        for batch in loader:
            for group in optim.param_groups:
                group['lr'] = scheduled_lr(lr, step, phases)
            logits = trained(_mae_features(backbone, batch['images'].to(device), feature))
            loss = F.cross_entropy(logits, batch['targets'].to(device))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f'{loss.item():.3f}', refresh=False)
    bar.close()

    accuracy = _evaluate_mae(backbone, head, val_dataset, feature, rank_batch, num_workers, device)
    return dict(protocol='mae', feature=feature, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                blr=blr, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, iterations=total_iters,
                **accuracy)


# ---------------------------------------------------------------------------------------------- DINOv2 sweep

def _subset(features: FeatureSet, index: Tensor) -> FeatureSet:
    # replace() keeps whatever other fields a FeatureSet carries
    return dataclasses.replace(features, cls_tokens=features.cls_tokens[index], avgpool=features.avgpool[index],
                               labels=features.labels[index])


@torch.no_grad()
def feature_statistics(data: FeatureSet, chunk_size: int = 65536) -> tuple[FeatureSet, FeatureSet]:
    """Per-column mean and standard deviation of ``data`` as two one-row :class:`FeatureSet` s.

    ``mean.select(name)`` is then the mean of ``data.select(name)`` for every feature name, concatenations included,
    without materialising them. Two passes in float64 over chunks, so that neither a copy of the whole set nor the
    cancellation of ``E[x^2] - E[x]^2`` on large offsets costs anything. Constant columns get a deviation of 1,
    as scikit-learn's ``StandardScaler`` does, so they stay constant (zero) instead of blowing up.
    """
    if not len(data):
        raise ValueError('feature statistics of an empty FeatureSet')
    fields = ('cls_tokens', 'avgpool')
    chunks = [slice(start, start + chunk_size) for start in range(0, len(data), chunk_size)]
    means = {field: sum(getattr(data, field)[rows].double().sum(0) for rows in chunks) / len(data)
             for field in fields}
    stds = {}
    for field in fields:
        variance = sum((getattr(data, field)[rows].double() - means[field]).square().sum(0) for rows in chunks)
        std = (variance / len(data)).sqrt()
        # a constant float32 column can still show a spread of rounding errors, relative to its magnitude
        constant = (std == 0) | (std < 1e-6 * means[field].abs())
        stds[field] = torch.where(constant, torch.ones_like(std), std)
    labels = torch.zeros(1, dtype=torch.long)
    return tuple(dataclasses.replace(data, labels=labels, **{field: values[field].float()[None] for field in fields})
                 for values in (means, stds))


class LinearHeadGrid(nn.Module):
    """``num_heads`` linear classifiers for each feature, evaluated with one batched product per feature.

    Head ``i`` of every feature is meant to share learning rate ``i``: :meth:`param_groups` returns one group per
    head index, so one optimizer steps all of them with their own rates. Weights start from normal(0, 0.01) and
    biases from zero, as DINOv2's ``LinearClassifier``. With ``standardise``, each feature is first shifted and
    scaled by fixed statistics (buffers, not trained), so every head sees zero-mean, unit-variance inputs.

    Args:
        in_dims: input width per feature name.
        num_heads: classifiers per feature.
        num_classes: outputs of each classifier.
        generator: random generator of the initial weights.
        standardise: ``(mean, std)`` of each feature name, each of shape [in_dims[name]].
    """

    def __init__(self, in_dims: Mapping[str, int], num_heads: int, num_classes: int,
                 generator: torch.Generator | None = None,
                 standardise: Mapping[str, tuple[Tensor, Tensor]] | None = None):
        super().__init__()
        self.feature_names = list(in_dims)
        self.num_heads, self.num_classes = num_heads, num_classes
        # ModuleDict keys may not contain '.', and feature names such as 'cls+avgpool' have none
        self.heads = nn.ModuleDict()
        for name, dim in in_dims.items():
            heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
            for head in heads:
                nn.init.normal_(head.weight, std=0.01, generator=generator)
                nn.init.zeros_(head.bias)
            self.heads[name] = heads
        self.standardised = standardise is not None
        if standardise is not None:
            for name, (mean, std) in standardise.items():
                if mean.shape != (in_dims[name],) or std.shape != (in_dims[name],):
                    raise ValueError(f'standardise[{name!r}] holds shapes {tuple(mean.shape)} and '
                                     f'{tuple(std.shape)}, expected ({in_dims[name]},)')
            # buffer names may not contain '.', feature names hold letters, digits and '+'
            for name in self.feature_names:
                mean, std = standardise[name]
                self.register_buffer(f'mean_{name}', mean.detach().float().clone())
                self.register_buffer(f'std_{name}', std.detach().float().clone())

    def param_groups(self, lrs: Sequence[float]) -> list[dict]:
        """One optimizer parameter group per head index, holding that head of every feature."""
        if len(lrs) != self.num_heads:
            raise ValueError(f'{len(lrs)} learning rates for {self.num_heads} heads per feature')
        return [dict(params=[p for name in self.feature_names for p in self.heads[name][i].parameters()], lr=lr)
                for i, lr in enumerate(lrs)]

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``inputs[name]`` [B, in_dims[name]] -> logits [num_heads, B, num_classes] per feature."""
        logits = {}
        for name in self.feature_names:
            values = inputs[name]
            if self.standardised:
                values = (values - getattr(self, f'mean_{name}')) / getattr(self, f'std_{name}')
            weight = torch.stack([head.weight for head in self.heads[name]])
            bias = torch.stack([head.bias for head in self.heads[name]])
            logits[name] = torch.einsum('bd,hcd->hbc', values, weight) + bias[:, None]
        return logits


def _inputs(batch: FeatureSet, names: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    return {name: batch.select(name).to(device, torch.float32) for name in names}


def _batches(num_samples: int, batch_size: int, iterations: int, generator: torch.Generator):
    """``iterations`` batches of indices: passes over ``range(num_samples)`` in fresh random orders, the last batch
    of each pass possibly smaller, the last pass possibly cut short."""
    step = 0
    while step < iterations:
        order = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples, batch_size):
            if step == iterations:
                return
            yield order[start:start + batch_size]
            step += 1


def train_head_grid(grid: LinearHeadGrid, train: FeatureSet, lrs: Sequence[float], epochs: int | None = None,
                    batch_size: int = 128, seed: int = 0, device: torch.device | str | None = None,
                    progress: bool = True, iterations: int | None = None) -> int:
    """Train every head of ``grid`` on the same batches of ``train``; head ``i`` at ``lrs[i]`` (already scaled).

    SGD with momentum 0.9 and no weight decay, the rates decayed to zero by one cosine over all iterations; the loss
    is the sum of every head's mean cross-entropy, so each head gets its own gradient. The length is ``epochs``
    passes over ``train`` or ``iterations`` batches (exactly one of the two); each pass draws a seeded random order
    and its last batch may be smaller. Returns the number of iterations.
    """
    if (epochs is None) == (iterations is None):
        raise ValueError(f'give exactly one of epochs ({epochs}) and iterations ({iterations})')
    num_samples = len(train.labels)
    total_iters = epochs * math.ceil(num_samples / batch_size) if iterations is None else iterations
    if total_iters < 1:
        raise ValueError(f'the schedule has {total_iters} iterations (epochs={epochs}, iterations={iterations}, '
                         f'{num_samples} samples)')
    device = _default_device(device)
    grid.to(device).train()
    phases = [dict(type='CosineAnnealingLR', begin=0, end=total_iters, eta_min=0.0)]
    optimizer = torch.optim.SGD(grid.param_groups(lrs), momentum=0.9, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total_iters, desc=f'linear sweep ({grid.num_heads * len(grid.feature_names)} heads)',
               disable=not progress or _world()[0] != 0)
    for step, index in enumerate(_batches(num_samples, batch_size, total_iters, generator)):
        batch = _subset(train, index)
        factor = scheduled_lr(1.0, step, phases)
        for group, lr in zip(optimizer.param_groups, lrs):
            group['lr'] = lr * factor
        labels = batch.labels.to(device)
        logits = grid(_inputs(batch, grid.feature_names, device))
        loss = sum(F.cross_entropy(values.flatten(0, 1), labels.repeat(grid.num_heads), reduction='sum')
                   for values in logits.values()) / len(labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
    bar.close()
    return total_iters


@torch.no_grad()
def evaluate_head_grid(grid: LinearHeadGrid, data: FeatureSet, batch_size: int = 1024,
                       device: torch.device | str | None = None) -> dict[str, list[dict[str, float]]]:
    """Top-1 / top-5 (percent) of every head: ``result[feature][i]`` is head ``i`` of that feature."""
    device = _default_device(device)
    grid.to(device).eval()
    metrics = {name: [Accuracy(topk=(1, 5)) for _ in range(grid.num_heads)] for name in grid.feature_names}
    for start in range(0, len(data.labels), batch_size):
        batch = _subset(data, torch.arange(start, min(start + batch_size, len(data.labels))))
        labels = batch.labels.to(device)
        for name, logits in grid(_inputs(batch, grid.feature_names, device)).items():
            for metric, head_logits in zip(metrics[name], logits):
                metric.update(head_logits, labels)
    return {name: [metric.compute() for metric in head_metrics] for name, head_metrics in metrics.items()}


def split_holdout(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, held_out)``: a seeded, class-stratified ``fraction`` of each class's samples held out.

    Every class with two samples or more keeps one on each side; a class of one sample stays in ``fit``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f'the held-out fraction must lie in (0, 1), got {fraction}')
    generator = torch.Generator().manual_seed(seed)
    fit, held_out = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held_out.append(members[:count])
        fit.append(members[count:])
    return torch.cat(fit).sort().values, torch.cat(held_out).sort().values

def _next_decade(lrs: Sequence[float], upward: bool) -> list[float]:
    """The rates of the grid's top (or bottom) decade moved one decade further out: 0.02, 0.05, 0.1 -> 0.2, 0.5, 1;
    a grid of one rate steps by 10."""
    # rounded to 12 digits so that 1e-4 / 10 prints as 1e-05
    if upward:
        return sorted(float(f'{lr * 10:.12g}') for lr in lrs if lr > max(lrs) / 10)
    return sorted(float(f'{lr / 10:.12g}') for lr in lrs if lr < min(lrs) * 10)


def _grid_edge(best: dict, entries: Sequence[dict], selection: str) -> str | None:
    """'top' or 'bottom' when ``best`` has the largest or smallest rate of its feature's heads and its neighbour on
    the grid scores lower on ``selection``, else None: a tie with the neighbour is a plateau, not a missed optimum."""
    heads = sorted((entry for entry in entries if entry['feature'] == best['feature']), key=lambda e: e['lr'])
    if len(heads) < 2:
        return None
    for edge, head, neighbour in (('bottom', heads[0], heads[1]), ('top', heads[-1], heads[-2])):
        if head['lr'] == best['lr'] and neighbour[selection]['top1'] < best[selection]['top1']:
            return edge
    return None


def linear_sweep(train: FeatureSet, val: FeatureSet | None, num_classes: int, lrs: Sequence[float] | None = None,
                 features: Sequence[str] = FEATURE_NAMES, epochs: int | None = None, batch_size: int = 128,
                 val_fraction: float = 0.1, seed: int = 0, device: torch.device | str | None = None,
                 progress: bool = True, iterations: int | None = None, standardise: bool = True,
                 grid_extensions: int | None = None) -> dict:
    """DINOv2's linear evaluation: ``len(lrs) x len(features)`` heads trained in one pass, the best one reported.

    Every head trains on the same batches for ``iterations`` steps (default :data:`SWEEP_ITERATIONS`), or for
    ``epochs`` passes over the training split when given instead. The learning rates are base values, each scaled
    by ``batch_size / 256``; the default grid :data:`SWEEP_LRS` is DINOv2's moved one decade up. With
    ``standardise`` (the default) each feature is shifted and scaled by the mean and deviation of the training
    split (the part the heads train on), and val and held-out features by the same numbers. When the chosen head's
    rate is the top or bottom of the grid and beats its neighbour there, the grid grows by one decade in that
    direction (:func:`_next_decade`),
    the new heads are trained on the same batches, and the choice is made again, up to ``grid_extensions`` times
    (default 2 for the default grid, 0 for given ``lrs``, which are trained as given); a rate still at the edge is
    logged as a warning.

    Why a fixed number of iterations: SGD on a convex, well-conditioned loss converges in a number of steps that
    depends on the conditioning and the noise of the gradient, not on how many distinct samples there are. On
    standardised features 1,000 steps of batch 128 reach a multinomial logistic regression solved to convergence
    (scikit-learn, C tuned on the same held-out split) within a point on sklearn's digits and on 100-class
    synthetic features, and 3,000 steps gain nothing more (see ``tests/probe/test_linear_convergence.py``); a
    small set is simply seen many times. Sets of ImageNet's size want more: DINOv2's 12,500.

    With ``val_fraction > 0`` a stratified, seeded ``val_fraction`` of ``train`` is held out and the head with the
    best top-1 there is chosen, so that ``val`` stays unseen by the choice; its accuracy is reported on that split
    and on ``val`` when given. ``val_fraction=0`` trains on all of ``train`` and chooses on ``val`` itself, as
    DINOv2 does on ImageNet (an optimistic number).

    Returns a dict with ``protocol``, ``optimizer``, ``epochs`` (passes over the training split, fractional under
    ``iterations``), ``batch_size``, ``iterations``, ``standardised``, ``lrs`` (the grid, extensions included),
    ``lr_at_edge`` (``'top'``, ``'bottom'`` or None for the chosen rate), ``selection`` (which split chose),
    ``best`` (``feature``, ``lr``, ``scaled_lr`` and per-split ``top1`` / ``top5``), and ``grid``: one entry per
    head with the same keys, by feature and then rate.
    """
    if not features:
        raise ValueError('features names no feature to probe')
    unknown = [name for name in features if name not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f'unknown features {unknown}; choose from {FEATURE_NAMES}')
    if grid_extensions is None:
        grid_extensions = 2 if lrs is None else 0
    lrs = sorted(SWEEP_LRS if lrs is None else lrs)
    if not lrs:
        raise ValueError('lrs names no learning rate')
    if not all(lr > 0 for lr in lrs):
        raise ValueError(f'learning rates must be positive, got {lrs}')
    if epochs is not None and iterations is not None:
        raise ValueError(f'give epochs ({epochs}) or iterations ({iterations}), not both')
    if val_fraction == 0 and val is None:
        raise ValueError('val_fraction=0 needs a val FeatureSet to choose the best head on')
    out_of_range = (train.labels < 0) | (train.labels >= num_classes)
    if out_of_range.any():
        index = int(out_of_range.nonzero()[0])
        raise ValueError(f'train label {int(train.labels[index])} at index {index} is outside 0..{num_classes - 1}')

    if val_fraction > 0:
        fit_index, held_out_index = split_holdout(train.labels, val_fraction, seed)
        fit, splits = _subset(train, fit_index), {'held_out': _subset(train, held_out_index)}
        selection = 'held_out'
    else:
        fit, splits, selection = train, {}, 'val'
    if val is not None:
        splits['val'] = val
    if iterations is None:
        iterations = SWEEP_ITERATIONS if epochs is None else epochs * math.ceil(len(fit) / batch_size)

    probe = _subset(fit, torch.arange(1))
    in_dims = {name: probe.select(name).shape[1] for name in features}
    statistics = None
    if standardise:
        mean, std = feature_statistics(fit)
        statistics = {name: (mean.select(name)[0], std.select(name)[0]) for name in features}

    def train_heads(grid_lrs: list[float]) -> list[dict]:
        scaled_lrs = [lr * batch_size / 256 for lr in grid_lrs]
        grid = LinearHeadGrid(in_dims, len(grid_lrs), num_classes, generator=torch.Generator().manual_seed(seed),
                              standardise=statistics)
        train_head_grid(grid, fit, scaled_lrs, batch_size=batch_size, seed=seed, device=device, progress=progress,
                        iterations=iterations)
        accuracies = {split: evaluate_head_grid(grid, data, device=device) for split, data in splits.items()}
        return [dict(feature=name, lr=lr, scaled_lr=scaled_lr,
                     **{split: accuracies[split][name][i] for split in splits})
                for name in features for i, (lr, scaled_lr) in enumerate(zip(grid_lrs, scaled_lrs))]

    def choose(entries: list[dict]) -> dict:
        # ties go to the lowest rate of the earliest feature: the entries are ordered by feature, then rate
        order = {name: i for i, name in enumerate(features)}
        entries.sort(key=lambda entry: (order[entry['feature']], entry['lr']))
        return max(entries, key=lambda entry: entry[selection]['top1'])

    entries = train_heads(lrs)
    best = choose(entries)
    for _ in range(grid_extensions):
        edge = _grid_edge(best, entries, selection)
        if edge is None:
            break
        extension = _next_decade(lrs, upward=edge == 'top')
        logger.info('best linear head at the %s of the lr grid (base lr %g): adding base lrs %s', edge, best['lr'],
                    extension)
        lrs = sorted(lrs + extension)
        entries += train_heads(extension)
        best = choose(entries)
    edge = _grid_edge(best, entries, selection)
    if edge is not None:
        logger.warning('best linear head: %s at base lr %g, the %s of the lr grid %s; the optimum may lie beyond it: '
                       'widen the grid (lrs) or let it extend (grid_extensions)', best['feature'], best['lr'], edge,
                       [float(f'{lr:.6g}') for lr in lrs])
    logger.info('best linear head: %s at base lr %g (%s top-1 %.2f)', best['feature'], best['lr'], selection,
                best[selection]['top1'])
    passes = epochs if epochs is not None else round(iterations * batch_size / len(fit), 2)
    return dict(protocol='sweep', optimizer='sgd', epochs=passes, batch_size=batch_size, iterations=iterations,
                standardised=standardise, lrs=lrs, lr_at_edge=edge, selection=selection, best=best, grid=entries)
