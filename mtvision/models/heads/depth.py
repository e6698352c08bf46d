"""Monocular depth head and its scale-invariant log loss."""
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.heads.fpn_decoder import FPNDecoder
from mtvision.registry import MODELS


def valid_depth(target: Tensor, min_depth: float = 1e-3) -> Tensor:
    """Pixels with a usable ground truth: finite and above ``min_depth`` (0 marks a missing measurement)."""
    return torch.isfinite(target) & (target > min_depth)


def images_with_depth(target: Tensor, min_depth: float = 1e-3) -> Tensor:
    """How many images of ``target`` ``[B, ...]`` have at least one valid pixel: what :func:`silog_loss` averages
    over (an int64 scalar)."""
    return valid_depth(target, min_depth).flatten(1).any(dim=1).sum()


def silog_loss(log_depth: Tensor, target: Tensor, min_depth: float = 1e-3, variance_focus: float = 0.85,
               scale: float = 10.0, normalizer: Tensor | float | None = None) -> Tensor:
    """Scale-invariant log loss of each image, ``scale * sqrt(mean(d^2) - variance_focus * mean(d)^2)`` over its
    valid pixels with ``d = log_depth - log(gt)``, summed over the images and divided by ``normalizer``.

    The loss of Eigen et al. (2014), defined per image (its scale invariance is the scale of one image), with the
    constants of BTS (Lee et al., 2019, "From Big to Small", ``silog_loss``: variance focus 0.85, scale 10), which
    AdaBins (Bhat et al., 2021) writes equivalently as ``10 * sqrt(var(d) + 0.15 * mean(d)^2)``. BTS and AdaBins take
    the means over all pixels of the batch instead; per image, the loss of a batch is a sum over its images, so
    data-parallel ranks and accumulated micro-batches give exactly the loss of the whole batch when the normaliser
    counts the images of the whole batch (what the trainer passes).

    Args:
        log_depth: predicted natural log of the depth, ``[B, ...]``.
        target: depth in metres, same shape; pixels that are not finite or not above ``min_depth`` are ignored.
        min_depth: pixels with ground truth at or below this are invalid.
        variance_focus: lambda; 1 makes the loss fully invariant to a global scale of an image's prediction, 0
            makes it the plain RMS of the log error.
        scale: factor on the result.
        normalizer: what the sum over images is divided by; by default the images of this batch with at least one
            valid pixel (:func:`images_with_depth`).

    Returns:
        A float32 scalar; zero (still attached to ``log_depth``'s graph) when no pixel is valid.
    """
    if log_depth.shape != target.shape:
        raise ValueError(f'depth prediction {list(log_depth.shape)} and target {list(target.shape)} differ in shape')
    # Under mixed precision the log-differences and their squared means would lose most of their bits.
    log_depth, target = log_depth.float(), target.float()
    valid = valid_depth(target, min_depth)
    # invalid pixels: a difference of exactly 0 with no gradient to the prediction
    diff = torch.where(valid, log_depth - torch.where(valid, target, 1.0).log(), 0.0).flatten(1)
    count = valid.flatten(1).sum(dim=1)
    has_depth = count > 0
    count = count.clamp(min=1)
    mean = diff.sum(dim=1) / count
    variance = diff.square().sum(dim=1) / count - variance_focus * mean.square()
    # A perfect prediction gives 0, where sqrt has an infinite gradient.
    per_image = scale * variance.clamp(min=1e-12).sqrt()
    if normalizer is None:
        normalizer = has_depth.sum().clamp(min=1)
    return torch.where(has_depth, per_image, 0.0).sum() / normalizer


@MODELS.register_module()
class DepthHead(nn.Module):
    """Dense depth: :class:`FPNDecoder` predicting log-depth at image size, trained with :func:`silog_loss`.

    Args:
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        embed_dim: unused; every head is built with the backbone's width.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`.
        channels: width of the decoder.
        min_depth: ground truth at or below this is invalid; predictions are clamped to at least this.
        max_depth: predictions are clamped to at most this.
        variance_focus: lambda of :func:`silog_loss`.
        loss_scale: scale of :func:`silog_loss`.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], embed_dim: int | None = None,
                 neck: dict | None = None, channels: int = 64, min_depth: float = 1e-3, max_depth: float = 10.0,
                 variance_focus: float = 0.85, loss_scale: float = 10.0):
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f'need 0 < min_depth < max_depth, got {min_depth} and {max_depth}')
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.variance_focus = variance_focus
        self.loss_scale = loss_scale
        self.decoder = FPNDecoder(in_channels, in_strides, 1, neck=neck, channels=channels)

    def forward(self, features: BackboneOutput) -> Tensor:
        """Natural log of the depth in metres, ``[B, 1, H, W]`` at the input image size."""
        return self.decoder(features)

    def loss_normalizer(self, targets: Tensor, image_size: tuple[int, int]) -> Tensor:
        """What :meth:`loss` averages over in ``targets``: the images with valid depth."""
        return images_with_depth(targets, self.min_depth)

    def loss(self, outputs: Tensor, targets: Tensor, normalizer: Tensor | None = None) -> dict[str, Tensor]:
        """Scale-invariant log loss (per image) against depth ``FloatTensor[B, 1, H, W]`` in metres (0 = invalid),
        averaged over the images with valid depth, or divided by ``normalizer`` (see :func:`silog_loss`)."""
        return dict(loss_silog=silog_loss(outputs, targets, self.min_depth, self.variance_focus, self.loss_scale,
                                          normalizer))

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> Tensor:
        """Depth in metres ``[B, 1, H, W]``, clamped to ``[min_depth, max_depth]``."""
        return outputs.float().exp().clamp(self.min_depth, self.max_depth)


__all__ = ['DepthHead', 'images_with_depth', 'silog_loss', 'valid_depth']
