"""Semantic segmentation head."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.heads.fpn_decoder import FPNDecoder
from mtvision.registry import MODELS


@MODELS.register_module()
class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al., 2019): :class:`FPNDecoder` logits at image size, pixel-wise cross-entropy.

    Args:
        num_classes: number of classes; target ids are ``0..num_classes - 1`` or ``ignore_index``.
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        embed_dim: unused; every head is built with the backbone's width.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`.
        channels: width of the decoder.
        ignore_index: target id of pixels that contribute no loss.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], in_strides: Sequence[int],
                 embed_dim: int | None = None, neck: dict | None = None, channels: int = 64,
                 ignore_index: int = 255):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.decoder = FPNDecoder(in_channels, in_strides, num_classes, neck=neck, channels=channels)

    def forward(self, features: BackboneOutput) -> Tensor:
        """Logits ``[B, num_classes, H, W]`` at the input image size."""
        return self.decoder(features)

    def loss_normalizer(self, targets: Tensor, image_size: tuple[int, int]) -> Tensor:
        """What :meth:`loss` averages over in ``targets``: the pixels not equal to ignore_index (the class ids are
        checked here, on the host, so that :meth:`loss` given the normaliser need not read the targets back)."""
        self._check_class_ids(targets)
        return (targets != self.ignore_index).sum()

    def _check_class_ids(self, targets: Tensor) -> None:
        valid = targets != self.ignore_index
        bad = valid & ((targets < 0) | (targets >= self.num_classes))
        if bad.any():
            raise ValueError(f'segmentation targets hold class ids {sorted(targets[bad].unique().tolist())} outside '
                             f'0..{self.num_classes - 1} (ignore_index {self.ignore_index})')

    def loss(self, outputs: Tensor, targets: Tensor, normalizer: Tensor | None = None) -> dict[str, Tensor]:
        """Cross-entropy summed over the pixels of ``targets`` ``LongTensor[B, H, W]`` not equal to ignore_index and
        divided by their number, or by ``normalizer`` (the trainer's count over every rank and micro-batch of the
        step, so that the update is the one of the whole batch).

        A batch with every pixel ignored gives a zero loss that still belongs to the graph.
        """
        expected = (outputs.shape[0], *outputs.shape[2:])
        if tuple(targets.shape) != expected:
            raise ValueError(f'segmentation targets must have shape {list(expected)}, got {list(targets.shape)}')
        if normalizer is None:  # else loss_normalizer has checked the ids on the host
            self._check_class_ids(targets)
            normalizer = (targets != self.ignore_index).sum().clamp(min=1)
        total = F.cross_entropy(outputs.float(), targets, ignore_index=self.ignore_index, reduction='sum')
        return dict(loss_seg=total / normalizer)

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> Tensor:
        """Class ids ``LongTensor[B, H, W]``."""
        return outputs.argmax(dim=1)


__all__ = ['SemanticFPNHead']
