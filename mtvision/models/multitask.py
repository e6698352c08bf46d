"""One shared backbone, one head per task."""
import copy
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from mtvision.models.heads.contrastive import cosine_momentum, ema_update
from mtvision.registry import MODELS


@MODELS.register_module()
class MultiTaskModel(nn.Module):
    """Backbone shared by all tasks plus a head per task.

    Args:
        backbone: config of the backbone (e.g. ``dict(type='ViT', ...)``).
        heads: ``{task name: head config}``; each head is built with the backbone's ``in_channels``,
            ``in_strides`` and ``embed_dim`` as default arguments.

    A head with a ``momentum`` attribute (MoCo v3) gets a momentum backbone: a frozen copy of the backbone, kept in
    ``momentum_backbones[task]``, whose features reach the head as ``key_features``; ``update_momentum`` moves it
    (and the head's own momentum modules) towards the online weights after each optimizer step.
    """

    def __init__(self, backbone: dict, heads: Mapping[str, dict]):
        super().__init__()
        try:
            self.backbone = MODELS.build(backbone)
        except TypeError as error:
            raise TypeError(f'model.backbone: {error}') from error
        geometry = dict(in_channels=self.backbone.out_channels, in_strides=self.backbone.out_strides,
                        embed_dim=self.backbone.embed_dim)
        self.heads = nn.ModuleDict()
        for task, head_cfg in heads.items():
            try:
                self.heads[task] = MODELS.build(head_cfg, default_args=geometry)
            except TypeError as error:
                raise TypeError(f'tasks.{task}.head: {error}') from error
        self.momentum_backbones = nn.ModuleDict()
        for task, head in self.heads.items():
            if getattr(head, 'momentum', None) is not None:
                self.momentum_backbones[task] = copy.deepcopy(self.backbone).requires_grad_(False)

    def features(self, task: str, images: Tensor):
        """The backbone's output for ``task``: masked when the task's head asks for it (``mask_ratio``, MAE)."""
        mask_ratio = getattr(self.heads[task], 'mask_ratio', None)
        return self.backbone(images) if mask_ratio is None else self.backbone(images, mask_ratio=mask_ratio)

    def forward(self, task: str, images: Tensor):
        """The raw outputs of ``task``'s head."""
        features = self.features(task, images)
        if task in self.momentum_backbones:
            with torch.no_grad():
                key_features = self.momentum_backbones[task](images)
            return self.heads[task](features, key_features)
        return self.heads[task](features)

    @torch.no_grad()
    def update_momentum(self, tasks: Iterable[str], step: int, max_steps: int) -> None:
        """EMA step of the momentum backbones (and the heads' momentum modules) of ``tasks`` that have one, with
        the head's ``cosine_momentum(head.momentum, step, max_steps)``."""
        for task in tasks:
            if task in self.momentum_backbones:
                head = self.heads[task]
                momentum = cosine_momentum(head.momentum, step, max_steps)
                ema_update(self.momentum_backbones[task], self.backbone, momentum)
                head.update_momentum(momentum)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online backbone into every momentum backbone (after loading new weights into the backbone)."""
        for momentum_backbone in self.momentum_backbones.values():
            ema_update(momentum_backbone, self.backbone, 0.0)

    def loss(self, task: str, batch: Mapping) -> dict[str, Tensor]:
        """Named loss terms of ``task`` on ``batch`` (``dict(images=..., targets=...)``)."""
        return self.heads[task].loss(self(task, batch['images']), batch['targets'])

    def predict(self, task: str, images: Tensor):
        return self.heads[task].predict(self(task, images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss depends on (what gradient surgery operates on)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return (p for p in self.heads[task].parameters() if p.requires_grad)

    def no_weight_decay(self) -> set[str]:
        return {f'backbone.{name}' for name in self.backbone.no_weight_decay()}
