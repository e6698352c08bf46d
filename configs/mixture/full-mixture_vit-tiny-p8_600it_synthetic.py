# The full mixture on the embedded data: MAE + contrastive (SimCLR) + classification + detection + segmentation +
# depth, one shared backbone, every task every step, the quick start's backbone and schedule.
_base_ = ['../quickstart/vit-tiny-p8_4task_synthetic.py', '../_base_/datasets/synthetic_mae_64px.py',
          '../_base_/datasets/synthetic_contrastive_64px.py']
tasks = dict(mae={{_base_._mae_task}}, contrastive={{_base_._contrastive_task}})
