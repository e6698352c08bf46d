"""Monocular depth metrics."""
import torch
from torch import Tensor

from mtvision.registry import METRICS


@METRICS.register_module()
class DepthMetric:
    """AbsRel, RMSE (metres) and delta1 (fraction 0..1), computed per image and averaged over images.

    This is the BTS / NYUv2 evaluation convention (also followed by AdaBins and Monocular-Depth-Estimation-Toolbox):
    each image's errors are averaged over its valid pixels first, so every image weighs the same whatever its number
    of valid pixels. A pixel is valid when its ground truth is above ``min_depth`` and, if set, below ``max_depth``;
    predictions are clamped to ``[min_depth, max_depth]`` (no upper bound when ``max_depth`` is None). Images
    without a valid pixel are skipped; before any evaluated image every key is ``nan``.

    Args:
        min_depth: smallest valid ground-truth depth in metres (0 marks an invalid pixel).
        max_depth: largest valid ground-truth depth in metres, e.g. 10 for NYUv2 or 80 for KITTI; None: no limit.
        dataset: unused; accepted because the trainer passes the validation dataset to every metric.
    """

    primary_key = 'abs_rel'
    higher_is_better = False

    def __init__(self, min_depth: float = 1e-3, max_depth: float | None = None, dataset=None):
        if max_depth is not None and max_depth <= min_depth:
            raise ValueError(f'max_depth ({max_depth}) must be larger than min_depth ({min_depth})')
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.reset()

    def reset(self) -> None:
        self._sums = dict(abs_rel=0.0, rmse=0.0, delta1=0.0)
        self._num_images = 0

    def state(self) -> dict:
        return dict(sums=dict(self._sums), num_images=self._num_images)

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        self._sums = {key: sum(s['sums'][key] for s in states) for key in self._sums}
        self._num_images = sum(s['num_images'] for s in states)

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Add a batch: ``predictions`` and ``targets`` depths in metres [B, 1, H, W], ground truth 0 = invalid."""
        if predictions.shape != targets.shape or predictions.ndim < 2:
            raise ValueError(f'DepthMetric expects predictions and targets of one shape [B, 1, H, W], got '
                             f'predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)}')
        # float64 keeps the per-pixel sums exact enough for large images
        gt = targets.to(predictions.device, torch.float64).flatten(1)
        pred = predictions.double().flatten(1).clamp(self.min_depth, self.max_depth)
        valid = gt > self.min_depth
        if self.max_depth is not None:
            valid &= gt < self.max_depth
        # invalid pixels get a harmless placeholder so that no division by zero reaches the masked sums
        gt = torch.where(valid, gt, 1.0)
        pred = torch.where(valid, pred, 1.0)
        num_valid = valid.sum(dim=1)
        evaluated = num_valid > 0
        num_valid = num_valid[evaluated]
        valid, gt, pred = valid[evaluated], gt[evaluated], pred[evaluated]

        abs_rel = ((pred - gt).abs() / gt * valid).sum(dim=1) / num_valid
        rmse = (((pred - gt) ** 2 * valid).sum(dim=1) / num_valid).sqrt()
        delta1 = ((torch.maximum(pred / gt, gt / pred) < 1.25) & valid).double().sum(dim=1) / num_valid
        self._sums['abs_rel'] += float(abs_rel.sum())
        self._sums['rmse'] += float(rmse.sum())
        self._sums['delta1'] += float(delta1.sum())
        self._num_images += int(evaluated.sum())

    def compute(self) -> dict[str, float]:
        if self._num_images == 0:
            return dict.fromkeys(self._sums, float('nan'))
        return {key: total / self._num_images for key, total in self._sums.items()}
