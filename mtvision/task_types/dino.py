"""Self-distillation (DINO, iBOT): a student matches a momentum teacher's outputs on other crops of the image."""
from mtvision.data.collate import collate_crops
from mtvision.registry import TASK_TYPES
from mtvision.task_types.contrastive import ContrastiveTaskType


@TASK_TYPES.register_module(name='dino')
class SelfDistillationTaskType(ContrastiveTaskType):
    """Drawn and scored as contrastive tasks are (can a global crop find the image's other one?); batched by
    :func:`~mtvision.data.collate.collate_crops`, whose ``local_images`` the student sees besides ``images``."""

    display_name = 'Self-distillation'
    collate = staticmethod(collate_crops)
