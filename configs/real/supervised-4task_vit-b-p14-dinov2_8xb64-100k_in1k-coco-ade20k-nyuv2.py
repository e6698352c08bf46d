# The four supervised tasks of supervised-4task_vit-b-p16 on timm's DINOv2 ViT-B/14 (layer scale, 224 px: a 16 x 16
# patch grid), the architecture of the upstream DINOv2 weights listed in configs/real/metafile.yml. Same scale
# (8xb64 classification images) and task sampling. Not run here.
_base_ = ['./supervised-4task_vit-b-p16_8xb64-100k_in1k-coco-ade20k-nyuv2.py']
model = dict(backbone=dict(model_name='vit_base_patch14_dinov2', img_size=224))
# ViTDet's 4x level would have a stride of 3.5 px on the stride-14 grid: three levels at strides 7, 14, 28 instead
_neck = dict(scale_factors=(2.0, 1.0, 0.5))
tasks = dict(det=dict(head=dict(neck=_neck)), seg=dict(head=dict(neck=_neck)), depth=dict(head=dict(neck=_neck)))
