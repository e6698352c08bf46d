from mtvision.engine.checkpoint import (find_last_checkpoint, load_training_state, load_weights, read_weights,
                                        save_checkpoint)
from mtvision.engine.evaluator import evaluate, metrics_table
from mtvision.engine.trainer import Trainer, build_model

__all__ = ['Trainer', 'build_model', 'evaluate', 'find_last_checkpoint', 'load_training_state', 'load_weights',
           'metrics_table', 'read_weights', 'save_checkpoint']
