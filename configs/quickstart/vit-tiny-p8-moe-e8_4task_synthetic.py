# The quick start with task-routed mixture-of-experts: the MLP of every other block (1, 3, 5) becomes 8 experts,
# top-2, one router per task (Mod-Squad), trained from scratch with the load-balancing, z- and task-expert
# mutual-information losses. Each evaluation draws pictures/expert_usage_iter_N.png.
_base_ = ['./vit-tiny-p8_4task_synthetic.py']
model = dict(
    backbone=dict(moe=dict(blocks='every_other', num_experts=8, top_k=2, router='per_task')),
    moe_loss_weights=dict(balance=0.01, z_loss=0.001, mutual_information=0.01),
)
