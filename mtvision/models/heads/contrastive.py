"""Contrastive objectives on two augmented views: SimCLR (Chen et al. 2020) and MoCo v3 (Chen, Xie & He 2021).

A contrastive batch holds ``V = 2`` views of ``B`` images stacked view-major, ``images[v * B + i]`` being view ``v``
of image ``i`` (``mtvision.data.collate.collate_views``), so the backbone sees all views in one forward. Under
``torch.distributed`` the embeddings of every rank serve as negatives (:func:`mtvision.distributed.gather_with_grad`),
so a run on W ranks optimises the same loss as one process on the global batch.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.distributed import gather_with_grad, rank_and_world, sum_with_grad
from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.ema import ema_update
from mtvision.registry import MODELS

__all__ = ['GlobalBatchNorm1d', 'MoCoV3Head', 'SimCLRHead', 'info_nce_loss', 'nt_xent_loss', 'pooled_feature',
           'projection_mlp']


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, every rank's rows together: SimCLR's
    "global BN" (and MoCo v3's SyncBN), without which a rank's normalisation, and so its loss, depends on how the
    batch is split. torch's SyncBatchNorm only runs on GPUs. A single process is plain BatchNorm1d; the weights and
    buffers are BatchNorm1d's, so checkpoints are the same."""

    def forward(self, x: Tensor) -> Tensor:
        _, world = rank_and_world()
        if not self.training or world == 1:
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f'GlobalBatchNorm1d takes [N, C] inputs, got {list(x.shape)}')
        x32 = x.float()
        total = sum_with_grad(torch.cat([x32.sum(dim=0), x32.new_tensor([x.shape[0]])]))
        mean, count = total[:-1] / total[-1].detach(), total[-1].detach()
        centered = x32 - mean  # two passes, as BatchNorm: E[x^2] - E[x]^2 would cancel for a small variance
        variance = sum_with_grad(centered.square().sum(dim=0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked + 1)
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean.detach(), momentum)  # as BatchNorm: the unbiased variance
                self.running_var.lerp_(variance.detach() * count / (count - 1).clamp(min=1), momentum)
        out = centered * torch.rsqrt(variance + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: ``num_layers`` Linears, each but the last followed by BatchNorm and ReLU; with ``last_bn`` the
    output gets a BatchNorm without affine parameters (MoCo v3's projector; SimCLR v2's projector ends the same
    way)."""
    if num_layers < 1:
        raise ValueError(f'num_layers must be at least 1, got {num_layers}')
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if not last:
            layers += [GlobalBatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GlobalBatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def nt_xent_loss(embeddings: Tensor, temperature: float, num_views: int = 2) -> Tensor:
    """SimCLR's NT-Xent: each embedding's positive is the other view of its image; its negatives are every other
    embedding of the (global) batch, both views, itself excluded.

    Args:
        embeddings: ``[num_views * B, D]``, view-major, L2-normalised.
        temperature: the softmax temperature tau.

    Returns the mean over this rank's ``2B`` rows of ``-log(exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau))``.
    """
    if num_views != 2:
        raise ValueError(f'NT-Xent pairs exactly two views, got num_views={num_views}')
    rows = embeddings.shape[0]
    if rows % 2:
        raise ValueError(f'{rows} embeddings cannot be two views of one batch')
    batch = rows // 2
    rank, _ = rank_and_world()
    keys = gather_with_grad(embeddings)  # [world * 2B, D], rank-major, each rank's block view-major
    logits = embeddings.float() @ keys.float().T / temperature
    local = torch.arange(rows, device=embeddings.device)
    self_index = rank * rows + local
    positive = rank * rows + (local + batch) % rows
    logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float('-inf'))
    return F.cross_entropy(logits, positive)


def info_nce_loss(queries: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """InfoNCE with in-batch negatives: query ``i``'s positive is key ``i``; the keys of every rank are negatives.

    ``queries`` and ``keys`` are ``[B, D]`` and L2-normalised; returns ``mean_i -log softmax(q_i . K / tau)[i]``.
    """
    rank, _ = rank_and_world()
    all_keys = gather_with_grad(keys)
    logits = queries.float() @ all_keys.float().T / temperature
    labels = rank * queries.shape[0] + torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, labels)


def pooled_feature(features: BackboneOutput, feature: str) -> Tensor:
    """The image-level feature an embedding head reads: ``'cls'`` (the class token) or ``'avg'`` (mean patch
    token)."""
    if feature == 'cls':
        if features.cls_token is None:
            raise ValueError("feature='cls' needs a backbone with a class token; this one has none: use "
                             "feature='avg'")
        return features.cls_token
    return features.pooled


class _ContrastiveHead(nn.Module):
    num_views = 2

    def __init__(self, embed_dim: int, feature: str, temperature: float):
        super().__init__()
        if feature not in ('cls', 'avg'):
            raise ValueError(f"feature must be 'cls' or 'avg', got {feature!r}")
        if temperature <= 0:
            raise ValueError(f'temperature must be positive, got {temperature}')
        self.embed_dim = embed_dim
        self.feature = feature
        self.temperature = temperature

    def _views(self, x: Tensor) -> int:
        if x.shape[0] % self.num_views:
            raise ValueError(f'a contrastive batch stacks {self.num_views} views of each image, but it holds '
                             f'{x.shape[0]} images: collate it with collate_views')
        return x.shape[0] // self.num_views

    @torch.no_grad()
    def predict(self, outputs: dict) -> Tensor:
        """L2-normalised embeddings ``[2B, D]`` of both views, view-major (for view-retrieval metrics)."""
        return F.normalize(outputs['embeddings'].float(), dim=-1)


@MODELS.register_module()
class SimCLRHead(_ContrastiveHead):
    """SimCLR: a projection MLP on the backbone's pooled feature, NT-Xent between the two views.

    Args:
        embed_dim: width of the backbone tokens.
        in_channels, in_strides: unused; every head is built with the backbone's map geometry.
        feature: ``'cls'`` (class token) or ``'avg'`` (mean patch token).
        hidden_dim, out_dim, num_layers: the projection MLP (SimCLR v2: 3 layers).
        temperature: NT-Xent's tau (SimCLR: 0.1 to 0.5 depending on the batch size).
    """

    def __init__(self, embed_dim: int, in_channels: Sequence[int] = (), in_strides: Sequence[int] = (),
                 feature: str = 'cls', hidden_dim: int = 512, out_dim: int = 128, num_layers: int = 2,
                 temperature: float = 0.2):
        super().__init__(embed_dim, feature, temperature)
        self.projector = projection_mlp(embed_dim, hidden_dim, out_dim, num_layers)

    def forward(self, features: BackboneOutput) -> dict:
        pooled = pooled_feature(features, self.feature)
        self._views(pooled)
        return dict(embeddings=self.projector(pooled))

    def loss(self, outputs: dict, targets=None) -> dict[str, Tensor]:
        embeddings = F.normalize(outputs['embeddings'].float(), dim=-1)
        return dict(loss_contrastive=nt_xent_loss(embeddings, self.temperature, self.num_views))


@MODELS.register_module()
class MoCoV3Head(_ContrastiveHead):
    """MoCo v3: queries from the online backbone, projector and predictor; keys from a momentum (EMA) copy of the
    backbone and projector; the symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)``, each scaled by ``2 * tau`` as in
    MoCo v3's code.

    The momentum backbone lives in :class:`~mtvision.models.multitask.MultiTaskModel` (which builds one for every
    head with a ``momentum`` attribute and passes its features as ``key_features``); the momentum projector lives
    here. Both follow ``m = cosine_momentum(momentum, step, max_steps)`` after each optimizer step
    (``MultiTaskModel.update_momentum``).

    Args:
        embed_dim: width of the backbone tokens.
        in_channels, in_strides: unused; every head is built with the backbone's map geometry.
        feature: ``'cls'`` (class token) or ``'avg'`` (mean patch token).
        hidden_dim, out_dim: the MLPs' widths (MoCo v3: 4096 and 256).
        proj_layers, pred_layers: depths of projector and predictor (MoCo v3 ViT: 3 and 2).
        temperature: tau (MoCo v3 ViT: 0.2).
        momentum: the EMA coefficient at step 0 (MoCo v3 ViT: 0.99), raised to 1 by a half cosine.
    """

    def __init__(self, embed_dim: int, in_channels: Sequence[int] = (), in_strides: Sequence[int] = (),
                 feature: str = 'cls', hidden_dim: int = 512, out_dim: int = 128, proj_layers: int = 3,
                 pred_layers: int = 2, temperature: float = 0.2, momentum: float = 0.99):
        super().__init__(embed_dim, feature, temperature)
        if not 0 <= momentum <= 1:
            raise ValueError(f'momentum must be in [0, 1], got {momentum}')
        self.momentum = momentum
        self.projector = projection_mlp(embed_dim, hidden_dim, out_dim, proj_layers)
        self.predictor = projection_mlp(out_dim, hidden_dim, out_dim, pred_layers, last_bn=False)
        self.momentum_projector = projection_mlp(embed_dim, hidden_dim, out_dim, proj_layers)
        self.momentum_projector.load_state_dict(self.projector.state_dict())
        self.momentum_projector.requires_grad_(False)

    def forward(self, features: BackboneOutput, key_features: BackboneOutput | None = None) -> dict:
        pooled = pooled_feature(features, self.feature)
        self._views(pooled)
        embeddings = self.projector(pooled)
        outputs = dict(embeddings=embeddings, queries=self.predictor(embeddings))
        if key_features is not None:
            with torch.no_grad():
                outputs['keys'] = self.momentum_projector(pooled_feature(key_features, self.feature))
        return outputs

    def loss(self, outputs: dict, targets=None) -> dict[str, Tensor]:
        if 'keys' not in outputs:
            raise ValueError('MoCoV3Head.loss needs the momentum keys: call it through MultiTaskModel, which passes '
                             'the momentum backbone features')
        q1, q2 = F.normalize(outputs['queries'].float(), dim=-1).chunk(2)
        k1, k2 = F.normalize(outputs['keys'].float(), dim=-1).chunk(2)
        scale = 2 * self.temperature
        loss = scale * (info_nce_loss(q1, k2, self.temperature) + info_nce_loss(q2, k1, self.temperature))
        return dict(loss_contrastive=loss)

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """``momentum_projector <- momentum * momentum_projector + (1 - momentum) * projector``."""
        ema_update(self.momentum_projector, self.projector, momentum)
