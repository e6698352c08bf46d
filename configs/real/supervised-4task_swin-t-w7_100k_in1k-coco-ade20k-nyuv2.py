# The four supervised tasks of supervised-4task_vit-b-p16 on Swin-T (window 7, 224 px, four stages at strides 4 to
# 32), the architecture of the upstream Swin-T weights listed in configs/real/metafile.yml. Not run here.
_base_ = ['./supervised-4task_vit-b-p16_100k_in1k-coco-ade20k-nyuv2.py']
model = dict(backbone=dict(_delete_=True, type='Swin', model_name='swin_tiny_patch4_window7_224', img_size=224,
                           drop_path_rate=0.2, out_indices=(0, 1, 2, 3)))
tasks = dict(cls=dict(head=dict(feature='avg')))  # Swin has no class token
