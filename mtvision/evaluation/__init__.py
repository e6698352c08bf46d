"""Evaluation metrics, one module per task type, registered in ``METRICS``.

Every metric follows one protocol: ``reset()``, ``update(predictions, targets)`` with the head's prediction format
and the batch's target format (docs/ARCHITECTURE.md), and ``compute() -> dict[str, float]``. The class attributes
``primary_key`` and ``higher_is_better`` name the number that summarises a metric and which way is better.
For evaluation sharded over ranks, ``state()`` returns a picklable summary of what was seen and ``merge(states)``
makes a metric the metric of all the shards.
"""
from mtvision.evaluation.classification import Accuracy
from mtvision.evaluation.contrastive import ViewRetrieval
from mtvision.evaluation.depth import DepthMetric
from mtvision.evaluation.detection import COCODetectionMetric
from mtvision.evaluation.multilabel import MultiLabelMetric
from mtvision.evaluation.normals import NormalsMetric
from mtvision.evaluation.reconstruction import ReconstructionMetric
from mtvision.evaluation.segmentation import SegmentationMetric

__all__ = ['Accuracy', 'COCODetectionMetric', 'DepthMetric', 'MultiLabelMetric', 'NormalsMetric',
           'ReconstructionMetric', 'SegmentationMetric', 'ViewRetrieval']
