"""Which backbone a probe evaluates: ``MODEL`` is resolved as every entry point resolves a model
(:func:`mtvision.zoo.resolve`), then its backbone is built as follows:

- a checkpoint directory (``work_dirs/x/iter_600``) or a work dir (its last checkpoint): the architecture comes
  from the config saved with it;
- a weights file (or a URL, downloaded and verified): ``.safetensors`` written by mtvision carries its backbone
  config in the header; any other file (a ``.pth`` state dict, read with ``weights_only=True``) needs ``config=``
  (a training config file);
- ``timm:<name>`` (random init) or ``timm:<name>@<weights file>`` (a local timm weights file; nothing is
  downloaded);
- a model zoo name (``mtvision.list_models(pretrained=True)``): its published weights, downloaded and verified as
  ``get_model(name, pretrained=True)`` does, with the normalisation of its data config.

A stored config or header is data from whoever made the file: it is read without running anything and built with
:func:`mtvision.registry.build_from_stored` (mtvision's registered names and timm model names only). ``config=`` is
a config file, Python the user chose to run.
"""
import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from mmengine.config import Config

from mtvision.config import load_config
from mtvision.checkpoint import STATE_FILE, read_metadata, read_stored_config
from mtvision.models import backbone_config
from mtvision.models.backbones import ViT
from mtvision.models.moe import moe_layers
from mtvision.registry import MODELS, build_from_stored
from mtvision.tasks import IMAGENET_MEAN, IMAGENET_STD, normalize_stats
from mtvision.zoo.convert import load_backbone_state
from mtvision.zoo.resolve import Resolved, resolve

logger = logging.getLogger(__name__)


@dataclass
class LoadedBackbone:
    backbone: ViT  # eval mode, frozen
    fingerprint: str  # sha256 of architecture and weights: a feature cache key
    mean: tuple
    std: tuple
    img_size: int


def _fingerprint(backbone: torch.nn.Module, architecture: str) -> str:
    digest = hashlib.sha256(architecture.encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _first_normalize(cfg: Config) -> tuple[tuple, tuple]:
    for task in cfg.get('tasks', {}).values():
        dataset = task.get('val_dataset') or task.get('train_dataset') or {}
        return normalize_stats(dataset.get('pipeline'))
    return IMAGENET_MEAN, IMAGENET_STD


def _freeze(backbone: ViT) -> ViT:
    backbone.eval()
    for param in backbone.parameters():
        param.requires_grad_(False)
    return backbone


def _from_timm(resolved: Resolved) -> LoadedBackbone:
    backbone = ViT(model_name=resolved.timm_name, pretrained_file=str(resolved.path) if resolved.path else None)
    pretrained_cfg = backbone.model.pretrained_cfg
    return LoadedBackbone(_freeze(backbone), _fingerprint(backbone, resolved.spec), tuple(pretrained_cfg['mean']),
                          tuple(pretrained_cfg['std']), backbone.model.patch_embed.img_size[0])


def _from_zoo(entry) -> LoadedBackbone:
    from mtvision.zoo import get_model

    model = get_model(entry, pretrained=True)
    data_config = next(iter(model.data_config.values()))
    backbone = model.backbone
    return LoadedBackbone(_freeze(backbone), _fingerprint(backbone, json.dumps(model.cfg.to_dict()['model'],
                                                                              sort_keys=True, default=str)),
                          tuple(data_config['mean']), tuple(data_config['std']), backbone.model.patch_embed.img_size[0])


def load_backbone(spec: str, config: str | None = None, task: str | None = None) -> LoadedBackbone:
    """Build and load the backbone that ``spec`` names (see the module docstring), resolved as every entry point
    resolves a model (:func:`mtvision.zoo.resolve`)."""
    resolved = resolve(spec)
    if resolved.kind == 'timm':
        loaded = _from_timm(resolved)
    elif resolved.kind == 'zoo' and config is None:
        loaded = _from_zoo(resolved.entry)
    else:
        path = resolved.path
        if config is not None:  # the user's own config file: built as a training run builds it
            cfg = load_config(config)
            backbone_cfg = backbone_config(cfg)
            mean, std = _first_normalize(cfg)
            backbone = MODELS.build(backbone_cfg)
        elif resolved.is_checkpoint:
            cfg = read_stored_config(path)
            backbone_cfg, (mean, std) = backbone_config(cfg), _first_normalize(cfg)
            backbone = build_from_stored(MODELS, backbone_cfg, path / STATE_FILE)
        else:
            header = read_metadata(path).get('backbone')
            if header is None:
                raise ValueError(f'{spec} does not say which backbone it holds (no mtvision header): pass '
                                 '--config with the training config it came from')
            try:
                backbone_cfg = json.loads(header)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}: its backbone header is not JSON ({error})') from None
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            backbone = build_from_stored(MODELS, backbone_cfg, path)
        load_backbone_state(backbone, resolved.read_weights())
        img_size = backbone.model.patch_embed.img_size[0]
        loaded = LoadedBackbone(_freeze(backbone), _fingerprint(backbone, json.dumps(backbone_cfg, sort_keys=True)),
                                tuple(mean), tuple(std), img_size)
    routed = moe_layers(loaded.backbone)
    if routed:
        tasks = routed[0][1].tasks
        if task not in tasks:
            raise ValueError(f'{spec} has mixture-of-experts layers routed per task: pass --task, one of {list(tasks)}')
        for _, layer in routed:
            layer.task = task  # the frozen backbone always routes for this task
    elif task is not None:
        logger.info('--task %s: this backbone has no task-routed layers, so every task sees the same features', task)
    return loaded
