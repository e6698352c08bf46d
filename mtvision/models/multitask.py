"""One shared backbone, one head per task."""
from collections.abc import Iterator, Mapping

from torch import Tensor, nn

from mtvision.registry import MODELS


@MODELS.register_module()
class MultiTaskModel(nn.Module):
    """Backbone shared by all tasks plus a head per task.

    Args:
        backbone: config of the backbone (e.g. ``dict(type='ViT', ...)``).
        heads: ``{task name: head config}``; each head is built with the backbone's ``in_channels``,
            ``in_strides`` and ``embed_dim`` as default arguments.
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

    def features(self, task: str, images: Tensor):
        """The backbone's output for ``task``: masked when the task's head asks for it (``mask_ratio``, MAE)."""
        mask_ratio = getattr(self.heads[task], 'mask_ratio', None)
        return self.backbone(images) if mask_ratio is None else self.backbone(images, mask_ratio=mask_ratio)

    def forward(self, task: str, images: Tensor):
        """The raw outputs of ``task``'s head."""
        return self.heads[task](self.features(task, images))

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
