"""Top-k accuracy for classification heads."""
from collections.abc import Sequence

import torch
from torch import Tensor

from mtvision.registry import METRICS


@METRICS.register_module()
class Accuracy:
    """Top-k accuracy in percent (the mmpretrain convention), keys ``'top1'``, ``'top5'``, ...

    A ``k`` larger than the number of classes is clipped to it, so ``'top5'`` of a 3-class problem is 100; the key
    keeps the requested ``k`` so that logs and configs stay stable. Before any update every key is ``nan``.

    Args:
        topk: the values of ``k`` to report.
        dataset: unused; accepted because the trainer passes the validation dataset to every metric.
    """

    primary_key = 'top1'
    higher_is_better = True

    def __init__(self, topk: Sequence[int] = (1, 5), dataset=None):
        self.topk = tuple(int(k) for k in topk)
        if not self.topk or min(self.topk) < 1:
            raise ValueError(f'topk must be a non-empty sequence of positive integers, got {tuple(topk)}')
        self.reset()

    def reset(self) -> None:
        self._correct = dict.fromkeys(self.topk, 0)
        self._num_samples = 0

    def state(self) -> dict:
        return dict(correct=dict(self._correct), num_samples=self._num_samples)

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        self._correct = {k: sum(s['correct'][k] for s in states) for k in self.topk}
        self._num_samples = sum(s['num_samples'] for s in states)

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Add a batch: ``predictions`` scores [B, K] (probabilities or logits), ``targets`` class indices [B]."""
        if predictions.ndim != 2 or targets.ndim != 1 or predictions.shape[0] != targets.shape[0]:
            raise ValueError(f'Accuracy expects predictions [B, K] and targets [B], got predictions '
                             f'{tuple(predictions.shape)} and targets {tuple(targets.shape)}')
        num_classes = predictions.shape[1]
        out_of_range = (targets < 0) | (targets >= num_classes)
        if out_of_range.any():
            index = int(out_of_range.nonzero()[0])
            raise ValueError(f'target {int(targets[index])} at batch index {index} is outside the '
                             f'{num_classes} predicted classes')
        ranked = predictions.topk(min(max(self.topk), num_classes), dim=1).indices
        hits = ranked == targets.to(ranked.device)[:, None]
        for k in self.topk:
            self._correct[k] += int(hits[:, :k].any(dim=1).sum())
        self._num_samples += targets.shape[0]

    def compute(self) -> dict[str, float]:
        if self._num_samples == 0:
            return {f'top{k}': float('nan') for k in self.topk}
        return {f'top{k}': 100.0 * correct / self._num_samples for k, correct in self._correct.items()}
