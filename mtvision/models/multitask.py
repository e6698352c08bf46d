"""One shared backbone, one head per task."""
import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mtvision.models.ema import cosine_momentum, ema_update
from mtvision.models.heads.protocols import MaskedImageHead, MaskedTokenHead, MomentumHead, ScheduledHead
from mtvision.models.moe import (auxiliary_losses, moe_layers, mutual_information_terms, pop_layer_statistics,
                                  routing_task)
from mtvision.config import to_plain
from mtvision.registry import MODELS

MOE_LOSS_WEIGHTS = dict(balance=0.01, z_loss=0.001, mutual_information=0.0)


@MODELS.register_module()
class MultiTaskModel(nn.Module):
    """Backbone shared by all tasks plus a head per task.

    Args:
        backbone: config of the backbone (e.g. ``dict(type='ViT', ...)``).
        heads: ``{task name: head config}``; each head is built with the backbone's ``in_channels``,
            ``in_strides`` and ``embed_dim`` as default arguments.
        moe_loss_weights: weights of the mixture-of-experts auxiliary losses, for backbones with MoE layers
            (``backbone.moe``): ``balance`` (Switch load balancing), ``z_loss`` (router z-loss) and
            ``mutual_information`` (Mod-Squad's task-expert MI, across the tasks of a step); defaults
            ``MOE_LOSS_WEIGHTS``.

    A backbone with MoE layers routes per task: it is built with ``tasks=list(heads)`` and every forward runs under
    :func:`~mtvision.models.moe.routing_task`; ``loss`` adds the weighted ``balance`` and ``z_loss`` of the task's
    forward to its terms, and ``cross_task_losses`` the MI terms once every task of a step has run.

    A head with a ``momentum`` attribute (MoCo v3, DINO) gets a momentum backbone: a frozen copy of the backbone,
    kept in ``momentum_backbones[task]`` and run in eval mode, whose features reach the head as ``key_features``;
    ``update_momentum`` moves it (and the head's own momentum modules) towards the online weights after each
    optimizer step. A batch's ``local_images`` (DINO's local crops) reach the head as ``local_features``.
    """

    def __init__(self, backbone: dict, heads: Mapping[str, dict], moe_loss_weights: Mapping[str, float] | None = None):
        super().__init__()
        unknown = set(moe_loss_weights or {}) - set(MOE_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f'model.moe_loss_weights: unknown keys {sorted(unknown)}; known: '
                             f'{sorted(MOE_LOSS_WEIGHTS)}')
        self.moe_loss_weights = {**MOE_LOSS_WEIGHTS, **(moe_loss_weights or {})}
        try:
            routed = dict(tasks=list(heads)) if backbone.get('moe') else None
            self.backbone = MODELS.build(backbone, default_args=routed)
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
            if isinstance(head, MomentumHead):
                self.momentum_backbones[task] = copy.deepcopy(self.backbone).requires_grad_(False)
        self.is_moe = bool(moe_layers(self.backbone))
        self._routing_probs: dict[str, list[Tensor]] = {}  # per task of the current step: each layer's mean probs
        self._captured_features: dict[str, Any] | None = None

    @contextmanager
    def capturing_features(self) -> Iterator[dict[str, Any]]:
        """Within the block, each task's backbone output (the shared representation, with its graph) is kept in
        the yielded dict by task: what feature-level gradient surgery differentiates against."""
        captured: dict[str, Any] = {}
        self._captured_features = captured
        try:
            yield captured
        finally:
            self._captured_features = None

    def features(self, task: str, images: Tensor):
        """The backbone's output for ``task`` (routed for it): masked when the task's head asks for it
        (``mask_ratio``: MAE, SimMIM; in training, a patch mask filled with its mask token: iBOT)."""
        head = self.heads[task]
        options = {}
        if isinstance(head, MaskedImageHead):
            options = dict(mask_ratio=head.mask_ratio)
        elif isinstance(head, MaskedTokenHead) and self.training:
            height, width = (size // self.backbone.patch_size for size in images.shape[-2:])
            patch_mask = head.sample_patch_mask(images.shape[0], height * width, images.device)
            if patch_mask is not None:
                options = dict(patch_mask=patch_mask, mask_token=head.mask_token)
        with routing_task(self.backbone, task):
            features = self.backbone(images, **options)
        if self._captured_features is not None:
            self._captured_features[task] = features
        return features

    def forward(self, task: str, images: Tensor, local_images: Tensor | None = None):
        """The raw outputs of ``task``'s head; ``local_images``: the small crops of a multi-crop batch (DINO),
        which the student sees besides ``images``."""
        features = self.features(task, images)
        extra = {}
        if local_images is not None:
            if self._captured_features is not None:
                raise ValueError(f'task {task!r}: feature-level gradient surgery differentiates against one backbone '
                                 f'output per task, and multi-crop batches have two (global and local crops); use '
                                 f'a parameter-level aggregator or no local crops')
            with routing_task(self.backbone, task):
                extra['local_features'] = self.backbone(local_images)
        if task in self.momentum_backbones:
            teacher = self.momentum_backbones[task]
            # as DINO's and MoCo v3's momentum encoders: no dropout, drop path or router noise
            was_training = teacher.training
            teacher.eval()
            try:
                with torch.no_grad(), routing_task(teacher, task):
                    key_features = teacher(images)
            finally:
                teacher.train(was_training)
            return self.heads[task](features, key_features, **extra)
        return self.heads[task](features, **extra)

    def start_step(self, step: int, max_steps: int) -> None:
        """Tell the heads that follow the training step (:class:`ScheduledHead`) which step begins."""
        for head in self.heads.values():
            if isinstance(head, ScheduledHead):
                head.start_step(step, max_steps)

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

    def loss_normalizer(self, task: str, batch: Mapping) -> Tensor | None:
        """What ``task``'s loss averages over in ``batch`` (valid pixels, positive points, images with depth), from
        the targets alone; None when the loss is a plain mean over the images (each rank's batch has as many)."""
        head = self.heads[task]
        if not hasattr(head, 'loss_normalizer'):
            return None
        return head.loss_normalizer(batch['targets'], tuple(batch['images'].shape[-2:]))

    def loss(self, task: str, batch: Mapping, normalizer: Tensor | None = None) -> dict[str, Tensor]:
        """Named loss terms of ``task`` on ``batch`` (``dict(images=..., targets=...)``), with the weighted MoE
        auxiliary losses of its forward when the backbone has MoE layers. ``normalizer`` replaces the batch's own
        count of what the loss averages over (see :meth:`loss_normalizer`)."""
        extra = {} if normalizer is None else dict(normalizer=normalizer)
        terms = self.heads[task].loss(self(task, batch['images'], batch.get('local_images')), batch['targets'],
                                      **extra)
        if self.is_moe:
            aux = auxiliary_losses(self.backbone)
            terms = dict(terms, loss_moe_balance=self.moe_loss_weights['balance'] * aux['balance'],
                         loss_moe_z=self.moe_loss_weights['z_loss'] * aux['z_loss'])
            if self.moe_loss_weights['mutual_information']:
                self._routing_probs[task] = [layer.last_aux['probs'] for _, layer in moe_layers(self.backbone)]
        return terms

    def group_losses(self, tasks: Sequence[str], batch: Mapping, normalizers: Mapping[str, Tensor] | None = None
                     ) -> dict[str, dict[str, Tensor]]:
        """Named loss terms of each of ``tasks`` on one batch of images labelled for all of them (``targets`` by
        task), as :meth:`loss` gives them: one backbone forward whose output every head reads, so the task losses
        share one representation (feature-level surgery then sees their cross terms).

        A backbone with task-routed MoE layers routes each task's tokens through that task's experts, so it runs one
        forward per task (no saving; a trunk shared up to the first routed block would be the next step), as a
        single task does. Heads that need a forward of their own (masked images, a momentum backbone) do not join
        groups (the trainer refuses them)."""
        normalizers = normalizers or {}
        if self.is_moe or len(tasks) == 1:
            return {task: self.loss(task, dict(batch, targets=batch['targets'][task]), normalizers.get(task))
                    for task in tasks}
        features = self.backbone(batch['images'])
        terms = {}
        for task in tasks:
            if self._captured_features is not None:
                self._captured_features[task] = features  # the same tensors for every task of the group
            extra = {} if normalizers.get(task) is None else dict(normalizer=normalizers[task])
            terms[task] = self.heads[task].loss(self.heads[task](features), batch['targets'][task], **extra)
        return terms

    def cross_task_losses(self) -> dict[str, Tensor]:
        """Loss terms that depend on several tasks' forwards of one step, by task, then forgets those forwards:
        the weighted task-expert mutual-information loss of each MoE layer, split so that task ``t``'s term is
        ``-P(t) KL(P(e|t) || P(e))`` (the terms sum to ``-MI``). Empty without MoE or with a zero MI weight."""
        probs, self._routing_probs = self._routing_probs, {}
        if not probs:
            return {}
        tasks = list(probs)
        per_layer = [torch.stack([probs[task][i] for task in tasks]) for i in range(len(probs[tasks[0]]))]
        terms = torch.stack([mutual_information_terms(table) for table in per_layer]).sum(dim=0)
        return {task: self.moe_loss_weights['mutual_information'] * term for task, term in zip(tasks, terms)}

    def expert_statistics(self) -> dict[str, dict]:
        """Routing counts of every MoE layer since the last call, which resets them: ``{layer name: dict(tasks,
        usage=[num_tasks, E] kept token assignments, dropped=[num_tasks], assigned=[num_tasks])}`` (see
        ``MoEMlp.pop_statistics``). The momentum backbones' routing is not counted."""
        layers = moe_layers(self.backbone)
        return {name.removeprefix('model.'): stats
                for (name, _), stats in zip(layers, pop_layer_statistics([layer for _, layer in layers]))}

    def predict(self, task: str, images: Tensor):
        return self.heads[task].predict(self(task, images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss depends on (what gradient surgery operates on)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return (p for p in self.heads[task].parameters() if p.requires_grad)

    def no_weight_decay(self) -> set[str]:
        names = {f'backbone.{name}' for name in self.backbone.no_weight_decay()}
        # MoE expert biases are stacked into 2-D tensors, which the optimizer's ndim rule would decay
        return names | {f'{layer_name}.{name}' for layer_name, layer in moe_layers(self)
                        for name in layer.no_weight_decay()}


def build_model(cfg, tasks: Mapping) -> MultiTaskModel:
    """The config's ``MultiTaskModel`` with a head per task of ``tasks`` (built tasks: each has a ``head`` config)."""
    model_cfg = to_plain(cfg.model)
    model_cfg.setdefault('type', 'MultiTaskModel')
    model_cfg['heads'] = {name: task.head for name, task in tasks.items()}
    return MODELS.build(model_cfg)


def backbone_config(cfg) -> dict:
    """The backbone's config as built: with MoE layers, the task names they route are part of it."""
    backbone = to_plain(cfg.model.backbone)
    if backbone.get('moe'):
        backbone.setdefault('tasks', list(cfg.tasks))
    return backbone
