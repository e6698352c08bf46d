from mtvision.models.heads.classification import ClassificationHead
from mtvision.models.heads.contrastive import MoCoV3Head, SimCLRHead
from mtvision.models.heads.depth import DepthHead, silog_loss
from mtvision.models.heads.dino import DINOHead
from mtvision.models.heads.detection import FCOSHead
from mtvision.models.heads.fpn_decoder import FPNDecoder
from mtvision.models.heads.mae import MAEHead, patchify, unpatchify
from mtvision.models.heads.mask_rcnn import MaskRCNNHead
from mtvision.models.heads.multilabel import MultiLabelClassificationHead, asymmetric_loss
from mtvision.models.heads.normals import NormalsHead
from mtvision.models.heads.protocols import MaskedImageHead, MaskedTokenHead, MomentumHead, ScheduledHead
from mtvision.models.heads.segmentation import SemanticFPNHead
from mtvision.models.heads.simmim import SimMIMHead, upsample_patch_mask
from mtvision.models.heads.upernet import UPerHead

__all__ = ['ClassificationHead', 'DINOHead', 'DepthHead', 'FCOSHead', 'FPNDecoder', 'MAEHead', 'MaskRCNNHead',
           'MaskedImageHead', 'MaskedTokenHead', 'MoCoV3Head', 'MomentumHead', 'MultiLabelClassificationHead',
           'NormalsHead', 'ScheduledHead', 'SemanticFPNHead', 'SimCLRHead', 'SimMIMHead', 'UPerHead', 'asymmetric_loss',
           'patchify', 'silog_loss', 'unpatchify', 'upsample_patch_mask']
