# A tiny Swin for 64x64 inputs: patch 4, window 4, widths 32-64-128-256, depths 2-2-2-2 (strides 4 to 32).
model = dict(
    type='MultiTaskModel',
    backbone=dict(
        type='Swin',
        model_name='swin_tiny_patch4_window7_224',
        img_size=64,
        window_size=4,
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        mask_patch_size=16,
    ),
)
