"""Models: importing this package registers the backbones, necks, heads and the multi-task model in MODELS."""
from mtvision.models import backbones, heads, multitask, necks
from mtvision.models.multitask import MultiTaskModel, backbone_config, build_model

__all__ = ['MultiTaskModel', 'backbone_config', 'backbones', 'build_model', 'heads', 'multitask', 'necks']
