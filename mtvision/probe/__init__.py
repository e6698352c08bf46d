"""Frozen-feature probes of a pre-trained backbone: kNN, linear (MAE protocol and DINOv2-style sweep) and dense."""
from mtvision.probe.features import (FEATURE_NAMES, FeatureSet, cached_features, classification_features,
                                     eval_pipeline, extract_features, image_folder_splits, knn_classify,
                                     probe_datasets)

__all__ = ['FEATURE_NAMES', 'FeatureSet', 'cached_features', 'classification_features', 'eval_pipeline',
           'extract_features', 'image_folder_splits', 'knn_classify', 'probe_datasets']
