"""Semantic segmentation metrics from an accumulated confusion matrix."""
import torch
from torch import Tensor

from mtvision.registry import METRICS


@METRICS.register_module()
class SegmentationMetric:
    """mIoU, mAcc and aAcc in percent, accumulated in a confusion matrix over the whole evaluation.

    Pixels whose ground truth is ``ignore_index`` are left out. As in mmseg's ``IoUMetric`` (areas of intersection,
    prediction and label per class summed over the whole set, then divided), a class's IoU is undefined (nan) when
    it appears neither in the ground truth nor in the prediction, its accuracy is undefined when it has no ground
    truth pixel, and the means skip undefined values (``nanmean``); mmseg also rounds to 2 decimals, this does not.
    The evaluator feeds it the ground truth at its original size. :meth:`per_class_iou` gives the per-class values.

    Args:
        num_classes: number of classes; ground truth must lie in ``[0, num_classes)`` or be ``ignore_index``.
        ignore_index: the ground-truth label of pixels that are not evaluated.
        dataset: unused; accepted because the trainer passes the validation dataset to every metric.
    """

    primary_key = 'mIoU'
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = 255, dataset=None):
        if num_classes < 1:
            raise ValueError(f'num_classes must be positive, got {num_classes}')
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        # rows: ground truth, columns: prediction
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def state(self) -> dict:
        return dict(confusion=self.confusion.clone())

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        self.confusion = torch.stack([s['confusion'].cpu() for s in states]).sum(dim=0)

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Add a batch: ``predictions`` and ``targets`` class ids of the same shape, e.g. [B, H, W]."""
        if predictions.shape != targets.shape:
            raise ValueError(f'SegmentationMetric expects predictions and targets of one shape, got predictions '
                             f'{tuple(predictions.shape)} and targets {tuple(targets.shape)}')
        targets = targets.to(predictions.device)
        valid = targets != self.ignore_index
        gt = targets[valid].long()
        pred = predictions[valid].long()
        self._check_range(gt, 'ground-truth')
        self._check_range(pred, 'predicted')
        pairs = torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes ** 2)
        self.confusion += pairs.reshape(self.num_classes, self.num_classes).cpu()

    def _check_range(self, labels: Tensor, kind: str) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f'{kind} label {int(labels[bad][0])} is outside [0, {self.num_classes}) and is not '
                             f'ignore_index={self.ignore_index}')

    def per_class_iou(self) -> Tensor:
        """IoU of each class in percent, float64 [num_classes]; nan for a class absent from prediction and truth."""
        confusion = self.confusion.double()
        intersection = confusion.diag()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - intersection
        return 100.0 * intersection / union

    def per_class_accuracy(self) -> Tensor:
        """Recall of each class in percent, float64 [num_classes]; nan for a class without ground-truth pixels."""
        confusion = self.confusion.double()
        return 100.0 * confusion.diag() / confusion.sum(dim=1)

    def compute(self) -> dict[str, float]:
        total = self.confusion.sum()
        return {
            'mIoU': float(self.per_class_iou().nanmean()),
            'mAcc': float(self.per_class_accuracy().nanmean()),
            'aAcc': float(100.0 * self.confusion.diag().sum() / total) if total > 0 else float('nan'),
        }
