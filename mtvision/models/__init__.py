"""Models: importing this package registers the backbones, necks, heads and the multi-task model in MODELS."""
from mtvision.models import backbones, heads, multitask, necks

__all__ = ['backbones', 'heads', 'multitask', 'necks']
