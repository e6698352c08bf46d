# A tiny ViT for 64x64 inputs: width 128, 6 blocks, 4 heads, patch 8 (an 8x8 token grid).
model = dict(
    type='MultiTaskModel',
    backbone=dict(
        type='ViT',
        model_name='vit_tiny_patch16_224',
        img_size=64,
        patch_size=8,
        embed_dim=128,
        depth=6,
        num_heads=4,
        out_indices=(-1,),
    ),
)
