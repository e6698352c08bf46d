"""Surface normal metrics: angular error over all valid pixels of the set (the NYUv2 protocol)."""
import math

import torch
from torch import Tensor

from mtvision.models.heads.normals import check_normals_shape, valid_normals
from mtvision.registry import METRICS

__all__ = ['NormalsMetric']

THRESHOLDS = (11.25, 22.5, 30.0)


def angular_error(predictions: Tensor, targets: Tensor) -> Tensor:
    """Angle in degrees between the normals of ``predictions`` and ``targets`` ``[B, 3, H, W]``, float64
    ``[B, H, W]``; neither needs unit length.

    ``atan2(|a x b|, a . b)``: unlike ``acos`` of the cosine it keeps its precision near 0 and 180 degrees, where
    small errors of a good model lie.
    """
    a, b = predictions.double(), targets.double()
    return torch.rad2deg(torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(a, b, dim=1), dim=1),
                                     (a * b).sum(dim=1)))


@METRICS.register_module()
class NormalsMetric:
    """Mean and median angular error (degrees) and the share (percent) of pixels within 11.25, 22.5 and 30 degrees.

    The protocol of Eigen & Fergus (ICCV 2015) and Ladicky et al. (ECCV 2014) on NYUv2: every valid pixel of the
    whole set weighs the same (no per-image averaging); a pixel is valid when its ground-truth normal is longer
    than 0.5 (zero vectors mark missing normals, as for :class:`~mtvision.models.heads.NormalsHead`). Keys
    ``mean``, ``median``, ``within_11.25``, ``within_22.5``, ``within_30``; every key is ``nan`` before any valid
    pixel.

    Mean and shares are exact sums. The median of hundreds of millions of pixels (NYUv2's 654 test images at
    480x640) cannot be gathered over ranks as raw errors, so the metric keeps a histogram of the errors in bins of
    ``bin_width`` degrees (18,000 int64 counts at 0.01: 144 kB per rank) and reads the median from it, interpolated
    linearly inside its bin: less than ``bin_width`` from the exact median (both lie in that bin), and the same
    number whether the set was seen in one pass or merged from shards, since merged counts are exactly those of
    one pass.

    Args:
        bin_width: width in degrees of the histogram bins the median is read from.
        dataset: unused; accepted because the trainer passes the validation dataset to every metric.
    """

    primary_key = 'mean'
    higher_is_better = False

    def __init__(self, bin_width: float = 0.01, dataset=None):
        if not 0 < bin_width <= 180:
            raise ValueError(f'bin_width must be in (0, 180] degrees, got {bin_width}')
        self.bin_width = bin_width
        self.num_bins = int(round(180.0 / bin_width))
        self.reset()

    def reset(self) -> None:
        self._histogram = torch.zeros(self.num_bins, dtype=torch.int64)
        self._error_sum = 0.0
        self._within = dict.fromkeys(THRESHOLDS, 0)
        self._num_pixels = 0

    def state(self) -> dict:
        return dict(histogram=self._histogram.clone(), error_sum=self._error_sum, within=dict(self._within),
                    num_pixels=self._num_pixels)

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        self._histogram = torch.stack([s['histogram'].cpu() for s in states]).sum(dim=0)
        self._error_sum = sum(s['error_sum'] for s in states)
        self._within = {t: sum(s['within'][t] for s in states) for t in THRESHOLDS}
        self._num_pixels = sum(s['num_pixels'] for s in states)

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Add a batch: ``predictions`` and ``targets`` normals ``[B, 3, H, W]`` (ground truth zero = invalid)."""
        check_normals_shape(predictions, 'NormalsMetric predictions')
        if predictions.shape != targets.shape:
            raise ValueError(f'NormalsMetric expects predictions and targets of one shape [B, 3, H, W], got '
                             f'predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)}')
        targets = targets.to(predictions.device)
        valid = valid_normals(targets)
        errors = angular_error(predictions, targets)[valid]
        # a zero-length or non-finite prediction has no direction (atan2(0, 0) = 0 would score it perfect): 90
        has_direction = torch.linalg.vector_norm(predictions.double(), dim=1)[valid] > 0
        errors = torch.where(has_direction & errors.isfinite(), errors, 90.0)
        bins = (errors / self.bin_width).long().clamp(max=self.num_bins - 1)
        self._histogram += torch.bincount(bins, minlength=self.num_bins).cpu()
        self._error_sum += float(errors.sum())
        for threshold in THRESHOLDS:
            self._within[threshold] += int((errors < threshold).sum())
        self._num_pixels += errors.numel()

    def median(self) -> float:
        """The median angular error in degrees, from the histogram (see the class docstring); nan when empty."""
        if self._num_pixels == 0:
            return float('nan')
        # numpy's median: the mean of the two middle errors of an even count
        middle = (self._num_pixels - 1) / 2
        return (self._error_at(math.floor(middle)) + self._error_at(math.ceil(middle))) / 2

    def _error_at(self, rank: int) -> float:
        """The ``rank``-th smallest error (zero-based), the errors of its bin taken as evenly spread over it: the
        k-th of n at (k + 0.5) / n of the bin's width."""
        cumulative = self._histogram.cumsum(0)
        index = int(torch.searchsorted(cumulative, rank, right=True))
        before = int(cumulative[index - 1]) if index > 0 else 0
        return (index + (rank - before + 0.5) / int(self._histogram[index])) * self.bin_width

    def compute(self) -> dict[str, float]:
        if self._num_pixels == 0:
            return dict(mean=float('nan'), median=float('nan'),
                        **{f'within_{threshold:g}': float('nan') for threshold in THRESHOLDS})
        return dict(mean=self._error_sum / self._num_pixels, median=self.median(),
                    **{f'within_{threshold:g}': 100.0 * count / self._num_pixels
                       for threshold, count in self._within.items()})
