from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.swin import Swin
from mtvision.models.backbones.vit import ViT

__all__ = ['BackboneOutput', 'Swin', 'ViT']
