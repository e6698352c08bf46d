# ViT-B/16 at 224 px (86 M parameters), timm's layout: the backbone of the real-data recipes.
model = dict(
    type='MultiTaskModel',
    backbone=dict(type='ViT', model_name='vit_base_patch16_224', img_size=224, drop_path_rate=0.1,
                  out_indices=(-1,)),
)
