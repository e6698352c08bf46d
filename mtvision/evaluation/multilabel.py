"""Multi-label classification metrics: mAP and F1, from every score and label of the evaluation."""
import torch
from torch import Tensor

from mtvision.registry import METRICS

__all__ = ['MultiLabelMetric', 'average_precision']

UNKNOWN = -1  # target value of a label that is not annotated: left out of every number


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision of one class, in percent: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score
    thresholds ``n`` in decreasing order, from ``scores`` ``[N]`` and ``labels`` ``[N]`` (1 positive, 0 negative,
    -1 left out); nan without a positive.

    Tied scores form one threshold, so the result does not depend on the order of the samples (the order shards
    are merged in); without ties it is mmpretrain's ``_average_precision`` (the mean precision at the rank of each
    positive), and with them scikit-learn's ``average_precision_score``.
    """
    known = labels != UNKNOWN
    scores, positive = scores[known].double(), labels[known] == 1
    num_positives = int(positive.sum())
    if num_positives == 0:
        return float('nan')
    order = scores.argsort(descending=True)
    scores, positive = scores[order], positive[order]
    true_positives = positive.cumsum(0)
    # the last sample of each run of equal scores closes a threshold
    last_of_threshold = torch.ones_like(positive)
    last_of_threshold[:-1] = scores[1:] != scores[:-1]
    ends = last_of_threshold.nonzero().squeeze(1)
    true_positives = true_positives[ends].double()
    precision = true_positives / (ends + 1)
    recall_gain = torch.diff(true_positives, prepend=true_positives.new_zeros(1)) / num_positives
    return 100.0 * float((recall_gain * precision).sum())


@METRICS.register_module()
class MultiLabelMetric:
    """mAP, and precision, recall and F1 at a score threshold, in percent, as mmpretrain's ``AveragePrecision``
    and ``MultiLabelMetric`` define them, except that classes without a positive are left out of the mAP.

    Keys:

    - ``mAP``: the mean over classes of :func:`average_precision`. Classes without a known positive label have no
      AP; they are skipped (mmpretrain counts them as 0) and their number is ``classes_without_positives``.
    - ``f1_macro``, ``precision_macro``, ``recall_macro`` (mmpretrain's ``average='macro'``; CF1, CP, CR): the
      mean over all classes of each class's value, a class with no predicted (or true) positive counting 0
      precision (recall).
    - ``f1_micro``, ``precision_micro``, ``recall_micro`` (``average='micro'``; OF1, OP, OR): from the true
      positives, predicted and true positives summed over all classes.

    A label is predicted positive when its score is at least ``threshold``; unknown labels (-1) count nowhere.
    Distributed evaluation gathers every shard's scores and labels (``state()``) and concatenates them: the
    numbers of the merged metric are those of one pass, whatever the order of the shards.

    Args:
        threshold: the score from which a label is predicted positive, for precision, recall and F1.
        dataset: unused; accepted because the trainer passes the validation dataset to every metric.
    """

    primary_key = 'mAP'
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, dataset=None):
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []

    def state(self) -> dict:
        return dict(scores=list(self._scores), labels=list(self._labels))

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        self._scores = [scores.cpu() for s in states for scores in s['scores']]
        self._labels = [labels.cpu() for s in states for labels in s['labels']]

    @torch.no_grad()
    def update(self, predictions: Tensor, targets: Tensor) -> None:
        """Add a batch: ``predictions`` scores ``[B, K]`` (probabilities), ``targets`` ``[B, K]`` with 1 present,
        0 absent and -1 unknown."""
        if predictions.ndim != 2 or predictions.shape != targets.shape:
            raise ValueError(f'MultiLabelMetric expects predictions and targets of one shape [B, K], got '
                             f'predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)}')
        if self._scores and predictions.shape[1] != self._scores[0].shape[1]:
            raise ValueError(f'MultiLabelMetric got {predictions.shape[1]} classes after '
                             f'{self._scores[0].shape[1]} in earlier batches')
        bad = (targets != UNKNOWN) & (targets != 0) & (targets != 1)
        if bad.any():
            image, label = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f'multi-label target {float(targets[image, label])} at batch index {image}, class '
                             f'{label} is not 1, 0 or {UNKNOWN} (unknown)')
        self._scores.append(predictions.detach().float().cpu())
        self._labels.append(targets.detach().to('cpu', torch.int8))

    def compute(self) -> dict[str, float]:
        keys = ('mAP', 'f1_macro', 'precision_macro', 'recall_macro', 'f1_micro', 'precision_micro',
                'recall_micro')
        if not self._scores:
            return dict.fromkeys(keys, float('nan')) | dict(classes_without_positives=float('nan'))
        scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        ap = torch.tensor([average_precision(scores[:, k], labels[:, k]) for k in range(scores.shape[1])],
                          dtype=torch.float64)
        has_ap = ~ap.isnan()
        known = labels != UNKNOWN
        predicted = (scores >= self.threshold) & known
        actual = (labels == 1) & known
        true_positives = (predicted & actual).sum(dim=0).double()
        predicted, actual = predicted.sum(dim=0).double(), actual.sum(dim=0).double()

        def precision_recall_f1(tp: Tensor, predicted: Tensor, actual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            # mmpretrain's _precision_recall_f1_support: 0 where a count is 0
            precision = 100.0 * tp / predicted.clamp(min=1)
            recall = 100.0 * tp / actual.clamp(min=1)
            f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
            return precision, recall, f1

        macro = [float(values.mean()) for values in precision_recall_f1(true_positives, predicted, actual)]
        micro = [float(values) for values in precision_recall_f1(true_positives.sum(), predicted.sum(),
                                                                 actual.sum())]
        return dict(mAP=float(ap[has_ap].mean()) if has_ap.any() else float('nan'),
                    precision_macro=macro[0], recall_macro=macro[1], f1_macro=macro[2],
                    precision_micro=micro[0], recall_micro=micro[1], f1_micro=micro[2],
                    classes_without_positives=float((~has_ap).sum()))
