"""Masked image modeling: how well the hidden pixels were reconstructed."""
import torch
from torch import Tensor

from mtvision.registry import METRICS


@METRICS.register_module()
class ReconstructionMetric:
    """Mean squared error over the masked pixels, in the normalised input space the MAE loss uses.

    ``predictions`` are the MAE head's ``dict(images=[B,3,H,W], mask=[B,1,H,W])`` (1 = masked pixel); ``targets``
    are the input images. Errors are pooled over every masked pixel and channel of the dataset. With
    ``norm_pix_loss`` the head predicts per-patch normalised pixels, which this metric does not undo: compare
    such runs by their loss instead.
    """

    primary_key = 'mse_masked'
    higher_is_better = False

    def __init__(self, dataset=None):
        self.reset()

    def reset(self) -> None:
        self.squared_error = 0.0
        self.count = 0

    def state(self) -> dict:
        return dict(squared_error=self.squared_error, count=self.count)

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        self.squared_error = sum(s['squared_error'] for s in states)
        self.count = sum(s['count'] for s in states)

    def update(self, predictions: dict, targets: Tensor) -> None:
        reconstruction, mask = predictions['images'].float(), predictions['mask'].float()
        if reconstruction.shape != targets.shape or mask.shape[-2:] != targets.shape[-2:]:
            raise ValueError(f'reconstruction {tuple(reconstruction.shape)}, mask {tuple(mask.shape)} and images '
                             f'{tuple(targets.shape)} must agree')
        error = (reconstruction - targets.float()) ** 2 * mask
        self.squared_error += float(error.sum(dtype=torch.float64))
        self.count += int(mask.sum()) * targets.shape[1]

    def compute(self) -> dict[str, float]:
        return {'mse_masked': self.squared_error / self.count if self.count else float('nan')}
