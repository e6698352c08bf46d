# The four supervised tasks of supervised-4task_vit-b-p16 on Swin-T (window 7, 224 px, four stages at strides 4 to
# 32), the architecture of the upstream Swin-T weights listed in configs/real/metafile.yml. Same scale (8xb64
# classification images) and task sampling. Not run here.
_base_ = ['./supervised-4task_vit-b-p16_8xb64-100k_in1k-coco-ade20k-nyuv2.py']
model = dict(backbone=dict(_delete_=True, type='Swin', model_name='swin_tiny_patch4_window7_224', img_size=224,
                           drop_path_rate=0.2, out_indices=(0, 1, 2, 3)))
# the pyramid is built from the last stage (stride 32): scale factors 8-1 give the ViT recipe's strides 4 to 32
_neck = dict(scale_factors=(8.0, 4.0, 2.0, 1.0))
tasks = dict(cls=dict(head=dict(feature='avg')),  # Swin has no class token
             det=dict(head=dict(neck=_neck)), seg=dict(head=dict(neck=_neck)), depth=dict(head=dict(neck=_neck)))
