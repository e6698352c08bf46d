# MAE beside the four supervised tasks of the quick start, every task every step, same backbone and schedule.
_base_ = ['../quickstart/vit-tiny-p8_4task_synthetic.py', '../_base_/datasets/synthetic_mae_64px.py']
tasks = dict(mae={{_base_._mae_task}})
