"""Surface normal head: unit normals per pixel, trained with a cosine or L1 loss on the valid pixels.

Normals are unit vectors in the camera frame of :mod:`mtvision.data.surface_normals`: x right, y down, z forward
(OpenCV's frame), pointing toward the camera, so a visible surface has z < 0. Datasets stored in another frame
(NYUv2 normal maps of Ladicky et al., ECCV 2014, and Eigen & Fergus, ICCV 2015, come from several toolboxes) must be
converted when they are read. Loss and metric compare directions only, so they hold in any frame that ground truth
and prediction share.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.heads.fpn_decoder import FPNDecoder
from mtvision.registry import MODELS

LOSSES = ('cosine', 'l1')
# Invalid pixels are stored as zero vectors; resizing blends them with their valid neighbours, so a pixel counts
# when at least half of its length survived.
MIN_VALID_NORM = 0.5


def valid_normals(target: Tensor) -> Tensor:
    """Pixels of ``target`` ``[B, 3, H, W]`` with a ground-truth normal: length above 0.5, as ``[B, H, W]``."""
    return torch.linalg.vector_norm(target.float(), dim=1) > MIN_VALID_NORM


def check_normals_shape(tensor: Tensor, name: str) -> None:
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f'{name} must be normals [B, 3, H, W], got shape {list(tensor.shape)}')


@MODELS.register_module()
class NormalsHead(nn.Module):
    """Dense surface normals: :class:`FPNDecoder` predicting 3 channels at image size, L2-normalised per pixel.

    Args:
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        embed_dim: unused; every head is built with the backbone's width.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`.
        channels: width of the decoder.
        loss: ``'cosine'``, ``1 - cos`` of the angle to the ground truth, or ``'l1'``, the L1 distance of the unit
            vectors summed over x, y, z (the two losses of Bae et al., ICCV 2021, "Estimating and Exploiting the
            Aleatoric Uncertainty in Surface Normal Estimation", before their uncertainty term); both averaged over
            the valid pixels.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], embed_dim: int | None = None,
                 neck: dict | None = None, channels: int = 64, loss: str = 'cosine'):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
        self.loss_type = loss
        self.decoder = FPNDecoder(in_channels, in_strides, 3, neck=neck, channels=channels)

    def forward(self, features: BackboneOutput) -> Tensor:
        """Unnormalised normals ``[B, 3, H, W]`` at the input image size (resized outputs are normalised after,
        in :meth:`loss` and :meth:`predict`)."""
        return self.decoder(features)

    def loss_normalizer(self, targets: Tensor, image_size: tuple[int, int]) -> Tensor:
        """What :meth:`loss` averages over in ``targets``: the pixels with a valid normal."""
        check_normals_shape(targets, 'normals targets')
        return valid_normals(targets).sum()

    def loss(self, outputs: Tensor, targets: Tensor, normalizer: Tensor | None = None) -> dict[str, Tensor]:
        """The per-pixel loss summed over the valid pixels of ``targets`` ``FloatTensor[B, 3, H, W]`` (zero vector
        = invalid) and divided by their number, or by ``normalizer`` (the trainer's count over every rank and
        micro-batch of the step). A batch without a valid pixel gives a zero loss that still belongs to the graph.
        """
        check_normals_shape(targets, 'normals targets')
        if outputs.shape != targets.shape:
            raise ValueError(f'normals prediction {list(outputs.shape)} and target {list(targets.shape)} differ '
                             f'in shape')
        # under mixed precision the normalisation and the cosines near 1 would lose most of their bits
        predicted = F.normalize(outputs.float(), dim=1)
        target = targets.float()
        valid = valid_normals(target)
        target = F.normalize(target, dim=1)  # resizing shortens the ground-truth vectors too
        if self.loss_type == 'cosine':
            per_pixel = 1.0 - (predicted * target).sum(dim=1)
        else:
            per_pixel = (predicted - target).abs().sum(dim=1)
        if normalizer is None:
            normalizer = valid.sum().clamp(min=1)
        # where, not a product: invalid pixels get no gradient at all
        return dict(loss_normals=torch.where(valid, per_pixel, 0.0).sum() / normalizer)

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> Tensor:
        """Unit normals ``[B, 3, H, W]`` in the camera frame of the module docstring."""
        return F.normalize(outputs.float(), dim=1)


__all__ = ['NormalsHead', 'valid_normals']
