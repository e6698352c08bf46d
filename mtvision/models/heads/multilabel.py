"""Multi-label classification head: one sigmoid per class, binary cross-entropy or the asymmetric loss."""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtvision.models.heads.classification import ClassificationHead
from mtvision.registry import MODELS

LOSSES = ('bce', 'asymmetric')
UNKNOWN = -1  # target value of a label that is not annotated: it contributes no loss


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8) -> Tensor:
    """The asymmetric loss (ASL) of every element, ``[B, K]`` (Ridnik et al., ICCV 2021, "Asymmetric Loss For
    Multi-Label Classification", Eq. 7, as the authors' ``AsymmetricLoss`` computes it).

    With ``p = sigmoid(logit)``: positives ``-(1 - p)^gamma_pos log(p)``; negatives ``-p_m^gamma_neg log(1 - p_m)``
    with the shifted probability ``p_m = max(p - clip, 0)``, which discards very easy negatives altogether.
    Soft targets ``y`` in [0, 1] mix the two terms by ``y`` and ``1 - y``.
    """
    probability = logits.sigmoid()
    negative_probability = probability
    if clip > 0:
        negative_probability = (probability - clip).clamp(min=0)
    positive = targets * (1 - probability).pow(gamma_pos) * probability.clamp(min=eps).log()
    negative = ((1 - targets) * negative_probability.pow(gamma_neg)
                * (1 - negative_probability).clamp(min=eps).log())
    return -(positive + negative)


@MODELS.register_module()
class MultiLabelClassificationHead(ClassificationHead):
    """Independent binary classifiers on the class token or the mean patch token (the features and layers of
    :class:`ClassificationHead`), trained with ``'bce'`` or ``'asymmetric'`` loss (:func:`asymmetric_loss`).

    Targets are ``FloatTensor[B, K]``: 1 present, 0 absent (values in between are soft labels), -1 unknown (no
    loss, no gradient). The loss is averaged over the known labels, as ``BCEWithLogitsLoss`` averages over all and
    mmpretrain averages its ``AsymmetricLoss``; the count of known labels depends on the data, hence
    :meth:`loss_normalizer`.

    Args:
        num_classes: number of classes.
        embed_dim: width of the backbone tokens.
        in_channels: unused; every head is built with the backbone's map channels.
        in_strides: unused; every head is built with the backbone's map strides.
        feature: ``'cls'`` for the class token, ``'avg'`` for the mean of the patch tokens.
        dropout: dropout rate before the classifier.
        loss: ``'bce'`` or ``'asymmetric'``.
        gamma_neg: ASL focusing exponent of the negatives (the paper's default 4).
        gamma_pos: ASL focusing exponent of the positives (default 0: plain log-likelihood).
        clip: ASL probability margin of the negatives (default 0.05).
    """

    def __init__(self, num_classes: int, embed_dim: int, in_channels: Sequence[int] = (),
                 in_strides: Sequence[int] = (), feature: str = 'cls', dropout: float = 0.0, loss: str = 'bce',
                 gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
        super().__init__(num_classes, embed_dim, in_channels, in_strides, feature=feature, dropout=dropout)
        if loss not in LOSSES:
            raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
            raise ValueError(f'need gamma_neg >= 0, gamma_pos >= 0 and 0 <= clip < 1, got {gamma_neg}, '
                             f'{gamma_pos} and {clip}')
        self.loss_type = loss
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip

    def _check_targets(self, targets: Tensor) -> None:
        if targets.ndim != 2 or targets.shape[1] != self.num_classes:
            raise ValueError(f'multi-label targets must have shape [B, {self.num_classes}], got '
                             f'{list(targets.shape)}')
        bad = (targets != UNKNOWN) & ~((targets >= 0) & (targets <= 1))
        if bad.any():
            image, label = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f'multi-label target {float(targets[image, label])} at batch index {image}, class '
                             f'{label} is neither in [0, 1] nor {UNKNOWN} (unknown)')

    def loss_normalizer(self, targets: Tensor, image_size: tuple[int, int]) -> Tensor:
        """What :meth:`loss` averages over in ``targets``: the known labels (the values are checked here, on the
        host, so that :meth:`loss` given the normaliser need not read the targets back)."""
        self._check_targets(targets)
        return (targets != UNKNOWN).sum()

    def loss(self, outputs: Tensor, targets: Tensor, normalizer: Tensor | None = None) -> dict[str, Tensor]:
        """The loss of every known label of ``targets`` ``FloatTensor[B, K]`` summed and divided by their number,
        or by ``normalizer`` (the trainer's count over every rank and micro-batch of the step). A batch without
        a known label gives a zero loss that still belongs to the graph."""
        if normalizer is None:  # else loss_normalizer has checked the targets on the host
            self._check_targets(targets)
            normalizer = (targets != UNKNOWN).sum().clamp(min=1)
        logits, targets = outputs.float(), targets.float()
        known = targets != UNKNOWN
        # unknown labels: any valid target value, so that no nan reaches the where below
        targets = torch.where(known, targets, 0.0)
        if self.loss_type == 'bce':
            per_label = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
        else:
            per_label = asymmetric_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip)
        return dict(loss_multilabel=torch.where(known, per_label, 0.0).sum() / normalizer)

    @torch.no_grad()
    def predict(self, outputs: Tensor) -> Tensor:
        """Probability of each class ``[B, num_classes]``, independently of the others."""
        return outputs.float().sigmoid()


__all__ = ['MultiLabelClassificationHead', 'asymmetric_loss']
