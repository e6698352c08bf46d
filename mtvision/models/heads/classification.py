"""Image classification head."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.registry import MODELS


@MODELS.register_module()
class ClassificationHead(nn.Module):
    """A linear classifier on the class token or on the mean patch token, trained with cross-entropy.

    No norm layer: the backbone's tokens already went through its final norm, so (as in timm's ViT with
    ``global_pool='token'``) a Linear is all the head needs.

    Args:
        num_classes: number of classes.
        embed_dim: width of the backbone tokens.
        in_channels: unused; every head is built with the backbone's map channels.
        in_strides: unused; every head is built with the backbone's map strides.
        feature: ``'cls'`` for the class token, ``'avg'`` for the mean of the patch tokens.
        dropout: dropout rate before the classifier.
        label_smoothing: label smoothing of the cross-entropy (torch's), on hard and soft targets.
    """

    def __init__(self, num_classes: int, embed_dim: int, in_channels: Sequence[int] = (),
                 in_strides: Sequence[int] = (), feature: str = 'cls', dropout: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if feature not in ('cls', 'avg'):
            raise ValueError(f"feature must be 'cls' or 'avg', got {feature!r}")
        self.num_classes = num_classes
        self.feature = feature
        self.label_smoothing = label_smoothing
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, features: BackboneOutput) -> Tensor:
        """Logits ``[B, num_classes]``."""
        if self.feature == 'cls':
            if features.cls_token is None:
                raise ValueError("ClassificationHead(feature='cls') needs a backbone with a class token; "
                                 "this one has none: use feature='avg'")
            x = features.cls_token
        else:
            x = features.pooled
        return self.fc(self.dropout(x))

    def loss(self, outputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the logits against class indices ``LongTensor[B]`` or class probabilities
        ``FloatTensor[B, K]`` (MixUp's and CutMix's soft targets): the batch mean of ``-sum(t * log_softmax)``.

        ``label_smoothing`` is torch's on both: the target becomes ``(1 - e) * t + e / K``, so mixed one-hot targets
        get timm's ``Mixup(label_smoothing=e)`` targets.
        """
        soft = targets.is_floating_point()
        expected = tuple(outputs.shape) if soft else tuple(outputs.shape[:1])
        if tuple(targets.shape) != expected:
            raise ValueError(f'classification targets must be class indices of shape [{outputs.shape[0]}] or '
                             f'class probabilities of shape {list(outputs.shape)}, got {targets.dtype} '
                             f'{list(targets.shape)}')
        return dict(loss_cls=F.cross_entropy(outputs.float(), targets.float() if soft else targets,
                                             label_smoothing=self.label_smoothing))

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> Tensor:
        """Class probabilities ``[B, num_classes]``."""
        return outputs.float().softmax(dim=-1)


__all__ = ['ClassificationHead']
