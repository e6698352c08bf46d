from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.vit import ViT

__all__ = ['BackboneOutput', 'ViT']
