"""Task types, one module each, registered in ``TASK_TYPES`` under the name configs give ``tasks.<name>.type``.

Importing this package registers the built-in types (the registry's ``locations``); see :mod:`.base` for what a
type says and how to add one.
"""
from mtvision.task_types.base import DenseTaskType, TaskType, registered_task_types, resize_to, task_type_spec
# registration order is the order errors list the types in: the built-in ones as the docs introduce them
from mtvision.task_types import (classification, detection, segmentation, depth, mae, contrastive,  # noqa: F401
                                 normals, multilabel, instance_segmentation, dino)

__all__ = ['DenseTaskType', 'TaskType', 'registered_task_types', 'resize_to', 'task_type_spec']
