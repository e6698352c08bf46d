"""The training loop and evaluation (checkpoints: :mod:`mtvision.checkpoint`; models: :mod:`mtvision.models`)."""
from mtvision.engine.evaluator import evaluate, metrics_table
from mtvision.engine.trainer import Trainer

__all__ = ['Trainer', 'evaluate', 'metrics_table']

