# The four supervised tasks of supervised-4task_vit-b-p16 on timm's DINOv2 ViT-B/14 (layer scale, 224 px: a 16 x 16
# patch grid), the architecture of the upstream DINOv2 weights listed in configs/real/metafile.yml. Not run here.
_base_ = ['./supervised-4task_vit-b-p16_100k_in1k-coco-ade20k-nyuv2.py']
model = dict(backbone=dict(model_name='vit_base_patch14_dinov2', img_size=224))
