"""Registries of mtvision's buildable parts.

Configs name a part by ``type='RegisteredName'``; ``REGISTRY.build(cfg)`` turns the dict into the object.
``locations`` lets a registry import the modules that register into it on first use, so importing
``mtvision`` stays cheap (no torch, timm or cv2 until something is built).
"""
from mmengine.registry import Registry

MODELS = Registry('model', locations=['mtvision.models'])
DATASETS = Registry('dataset', locations=['mtvision.data'])
TRANSFORMS = Registry('transform', locations=['mtvision.data.transforms'])
METRICS = Registry('metric', locations=['mtvision.evaluation'])
AGGREGATORS = Registry('aggregator', locations=['mtvision.optim'])
