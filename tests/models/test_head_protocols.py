"""The head protocols the model checks: every registered head that masks its images or keeps a momentum encoder
says so through the protocol, and the others do not."""
import torch

from mtvision.models.heads import MaskedImageHead, MomentumHead
from mtvision.models.multitask import MultiTaskModel

BACKBONE = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                num_heads=2)
HEADS = dict(mae=dict(type='MAEHead', decoder_dim=16, decoder_depth=1, decoder_heads=2),
             mocov3=dict(type='MoCoV3Head', hidden_dim=16, out_dim=8),
             simclr=dict(type='SimCLRHead', hidden_dim=16, out_dim=8),
             cls=dict(type='ClassificationHead', num_classes=3))


def test_masked_and_momentum_heads_are_told_by_their_protocols_and_the_model_acts_on_them():
    model = MultiTaskModel(backbone=BACKBONE, heads=HEADS)
    masked = {task for task, head in model.heads.items() if isinstance(head, MaskedImageHead)}
    momentum = {task for task, head in model.heads.items() if isinstance(head, MomentumHead)}
    assert masked == {'mae'} and momentum == {'mocov3'}
    assert set(model.momentum_backbones) == momentum
    images = torch.randn(2, 3, 32, 32)  # 16 patches: MAE's 75% mask keeps 4 of them, beside the class token
    assert model.features('mae', images).tokens.shape[1] == 1 + 4
    assert model.features('cls', images).tokens.shape[1] == 1 + 16
