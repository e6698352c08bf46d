"""Monocular depth metrics, as published NYUv2 and KITTI tables compute them."""
import torch
from torch import Tensor

from mtvision.registry import METRICS

__all__ = ['DepthMetric', 'EIGEN_CROP', 'GARG_CROP', 'crop_mask']

# NYUv2's evaluation box of Eigen et al. (NIPS 2014) in pixels of the 480x640 image: rows 45:471, columns 41:601,
# as in BTS (cleinc/bts: pytorch/bts_eval.py, `eval_mask[45:471, 41:601] = 1`), AdaBins and DPT.
EIGEN_CROP = dict(size=(480, 640), rows=(45, 471), cols=(41, 601))
# KITTI's box of Garg et al. (ECCV 2016) as fractions of the ground truth's height and width, whatever its size
# (BTS's bts_eval.py and Monodepth2's evaluate_depth.py: rows 0.40810811:0.99189189, cols 0.03594771:0.96405229).
GARG_CROP = dict(rows=(0.40810811, 0.99189189), cols=(0.03594771, 0.96405229))
CROPS = ('eigen', 'garg')
KEYS = ('abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10', 'silog', 'delta1', 'delta2', 'delta3')


def crop_mask(crop: str, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Boolean [height, width], True inside the evaluation box ``crop`` (``'eigen'`` or ``'garg'``).

    The Eigen box is defined in pixels of NYUv2's 480x640 grid: ValueError for ground truth of another size
    (evaluate at the original resolution). The Garg box takes fractions of any size, truncated as BTS does.
    """
    if crop == 'eigen':
        if (height, width) != EIGEN_CROP['size']:
            raise ValueError(f'the Eigen crop is defined on the 480x640 NYUv2 grid but the ground truth is '
                             f'{height}x{width}; evaluate against the original ground truth (the dataset\'s '
                             f'original_target), not the resized one')
        (top, bottom), (left, right) = EIGEN_CROP['rows'], EIGEN_CROP['cols']
    elif crop == 'garg':
        (top, bottom), (left, right) = ([int(fraction * size) for fraction in GARG_CROP[axis]]
                                        for axis, size in (('rows', height), ('cols', width)))
    else:
        raise ValueError(f'crop must be one of {CROPS} or None, got {crop!r}')
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[top:bottom, left:right] = True
    return mask


@METRICS.register_module()
class DepthMetric:
    """The NYUv2 / KITTI depth metrics, computed per image and averaged over images.

    Keys: ``abs_rel`` mean(|pred - gt| / gt), ``sq_rel`` mean((pred - gt)^2 / gt), ``rmse`` (metres), ``rmse_log``
    sqrt(mean((ln pred - ln gt)^2)), ``log10`` mean(|log10 pred - log10 gt|), ``silog``
    100 * sqrt(mean(e^2) - mean(e)^2) with e = ln pred - ln gt, and ``delta1/2/3``, the fraction (0..1) of pixels
    with max(pred / gt, gt / pred) < 1.25, 1.25^2, 1.25^3: the definitions of BTS's ``compute_errors``
    (cleinc/bts: pytorch/bts_eval.py), which AdaBins and DPT share, Monodepth2 computing the same except SILog.

    The protocol is BTS's: predictions are clamped to ``[min_depth, max_depth]`` (NaN to ``min_depth``, infinity
    to ``max_depth``), a pixel counts when its ground truth lies in ``(min_depth, max_depth)`` and inside the
    ``crop`` box, each image's errors are averaged over its pixels and the metric is the mean over images, so every
    image weighs the same whatever its number of valid pixels. Images without a valid pixel are skipped; before any
    evaluated image every key is ``nan``. Published NYUv2 tables use ``max_depth=10`` and ``crop='eigen'`` on the
    original 480x640 ground truth; KITTI tables use ``max_depth=80`` and ``crop='garg'``.

    Args:
        min_depth: smallest valid ground-truth depth in metres (0 marks an invalid pixel).
        max_depth: largest valid ground-truth depth in metres, e.g. 10 for NYUv2 or 80 for KITTI; None: no limit.
        crop: None, ``'eigen'`` (NYUv2, ground truth must be 480x640) or ``'garg'`` (KITTI), see :func:`crop_mask`.
        median_scaling: scale each prediction by median(gt) / median(pred) over the image's valid pixels before
            clamping, as self-supervised (scale-ambiguous) protocols do (Monodepth2's ``evaluate_depth.py``).
        dataset: unused; accepted because the trainer passes the validation dataset to every metric.
    """

    primary_key = 'abs_rel'
    higher_is_better = False

    def __init__(self, min_depth: float = 1e-3, max_depth: float | None = None, crop: str | None = None,
                 median_scaling: bool = False, dataset=None):
        if max_depth is not None and max_depth <= min_depth:
            raise ValueError(f'max_depth ({max_depth}) must be larger than min_depth ({min_depth})')
        if min_depth <= 0:
            raise ValueError(f'min_depth must be positive (the metrics take logarithms), got {min_depth}')
        if crop is not None and crop not in CROPS:
            raise ValueError(f'crop must be one of {CROPS} or None, got {crop!r}')
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.crop = crop
        self.median_scaling = median_scaling
        self.reset()

    def reset(self) -> None:
        self._sums = dict.fromkeys(KEYS, 0.0)
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
        gt = targets.to(predictions.device, torch.float64)
        pred = predictions.double()
        valid = gt > self.min_depth
        if self.max_depth is not None:
            valid &= gt < self.max_depth
        if self.crop is not None:
            valid &= crop_mask(self.crop, *gt.shape[-2:], device=gt.device)
        gt, pred, valid = gt.flatten(1), pred.flatten(1), valid.flatten(1)
        num_valid = valid.sum(dim=1)
        evaluated = num_valid > 0
        num_valid, valid, gt, pred = num_valid[evaluated], valid[evaluated], gt[evaluated], pred[evaluated]
        if not len(gt):
            return
        upper = self.max_depth if self.max_depth is not None else torch.finfo(torch.float64).max
        pred = pred.nan_to_num(nan=self.min_depth, posinf=upper, neginf=self.min_depth)
        if self.median_scaling:
            # the quantile, not torch.median: numpy's median (Monodepth2's) averages the two middle values
            pred = pred * torch.stack([g[v].quantile(0.5) / p[v].quantile(0.5)
                                       for g, p, v in zip(gt, pred, valid)])[:, None]
        pred = pred.clamp(self.min_depth, self.max_depth)
        # invalid pixels get a harmless placeholder so that no division by zero or log of 0 reaches the sums
        gt = torch.where(valid, gt, 1.0)
        pred = torch.where(valid, pred, 1.0)

        def mean(values: Tensor) -> Tensor:
            return (values * valid).sum(dim=1) / num_valid

        difference = pred - gt
        log_difference = pred.log() - gt.log()
        ratio = torch.maximum(pred / gt, gt / pred)
        per_image = dict(
            abs_rel=mean(difference.abs() / gt),
            sq_rel=mean(difference ** 2 / gt),
            rmse=mean(difference ** 2).sqrt(),
            rmse_log=mean(log_difference ** 2).sqrt(),
            log10=mean((pred.log10() - gt.log10()).abs()),
            # a variance: rounding may leave it a hair below 0 for a prediction that is gt times a constant
            silog=100 * (mean(log_difference ** 2) - mean(log_difference) ** 2).clamp(min=0).sqrt(),
            **{f'delta{k}': mean((ratio < 1.25 ** k).double()) for k in (1, 2, 3)})
        for key, values in per_image.items():
            self._sums[key] += float(values.sum())
        self._num_images += len(gt)

    def compute(self) -> dict[str, float]:
        if self._num_images == 0:
            return dict.fromkeys(self._sums, float('nan'))
        return {key: total / self._num_images for key, total in self._sums.items()}
