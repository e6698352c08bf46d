"""Contrastive tasks: can an image's embedding find its other view?"""
import torch
from torch import Tensor

from mtvision.registry import METRICS


@METRICS.register_module()
class ViewRetrieval:
    """Top-1 retrieval of the other view within each evaluation batch, in both directions, and the mean cosine of
    positive pairs.

    ``predictions`` are L2-normalised embeddings ``[2B, D]``, view-major (a contrastive head's ``predict``);
    ``targets`` are unused. The candidates are the batch's other-view embeddings, so the score depends on the
    evaluation batch size (``val_batch_size``): compare runs at the same one.
    """

    primary_key = 'top1'
    higher_is_better = True

    def __init__(self, dataset=None):
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.queries = 0
        self.positive_cosine = 0.0

    def state(self) -> dict:
        return dict(correct=self.correct, queries=self.queries, positive_cosine=self.positive_cosine)

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        for key in ('correct', 'queries', 'positive_cosine'):
            setattr(self, key, sum(s[key] for s in states))

    def update(self, predictions: Tensor, targets=None) -> None:
        if predictions.ndim != 2 or predictions.shape[0] % 2:
            raise ValueError(f'expected view-major embeddings [2B, D], got shape {list(predictions.shape)}')
        first, second = predictions.double().chunk(2)
        similarity = first @ second.T
        expected = torch.arange(len(first), device=similarity.device)
        self.correct += int((similarity.argmax(dim=1) == expected).sum() + (similarity.argmax(dim=0) == expected).sum())
        self.queries += 2 * len(first)
        self.positive_cosine += float(similarity.diagonal().sum())

    def compute(self) -> dict[str, float]:
        if not self.queries:
            return {'top1': float('nan'), 'positive_cosine': float('nan')}
        return {'top1': 100.0 * self.correct / self.queries, 'positive_cosine': 2 * self.positive_cosine / self.queries}
