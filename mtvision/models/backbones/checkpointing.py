"""Activation checkpointing of backbone blocks, MoE blocks included.

A checkpointed block keeps only its input; the backward runs its forward again to rebuild the activations. The
wrappers checkpoint their blocks here rather than through timm's ``set_grad_checkpointing``, because the rerun
happens during the backward, after :func:`~mtvision.models.moe.routing_task` has restored the MoE layers' task:
timm's rerun would route for no task (an error) or for another one. Here the rerun routes for the task of its
forward and leaves what the forward recorded (``last_aux``, the routing counts) as the forward left it.

Non-reentrant checkpointing (``use_reentrant=False``): it supports ``torch.autograd.grad`` (the per-task gradients
of gradient surgery) and inputs without ``requires_grad``; the RNG state is replayed, so dropout, drop-path and
router noise draw the same values in the rerun.
"""
from contextlib import nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtvision.models.moe import MoEMlp, moe_layers


def run_block(block: nn.Module, x: Tensor, checkpointed: bool) -> Tensor:
    """``block(x)``; with ``checkpointed``, its activations recomputed in the backward instead of stored.

    Without gradients (evaluation, momentum encoders) nothing would be stored, so nothing is checkpointed.
    """
    if not checkpointed or not torch.is_grad_enabled():
        return block(x)
    layers = [layer for _, layer in moe_layers(block)]
    if not layers:
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False, context_fn=partial(_moe_contexts, layers))


def _moe_contexts(layers: list[MoEMlp]):
    # called at the forward: the rerun's context routes for the tasks the layers have now
    return nullcontext(), _Replay(layers, [layer.task for layer in layers])


class _Replay:
    """Context of a block's rerun: its MoE layers route for ``tasks``, and what they record is put back after.

    A class, not a generator context: each backward through a retained graph (gradient surgery's one per task)
    reruns the block and enters the same context again.
    """

    def __init__(self, layers: list[MoEMlp], tasks: list[str | None]):
        self.layers, self.tasks = layers, tasks
        self.saved = []

    def __enter__(self) -> None:
        self.saved = [(layer.task, layer.last_aux, layer.usage.clone(), layer.dropped.clone(), layer.assigned.clone())
                      for layer in self.layers]
        for layer, task in zip(self.layers, self.tasks):
            layer.task = task

    def __exit__(self, *exc_info) -> None:
        for layer, (task, last_aux, usage, dropped, assigned) in zip(self.layers, self.saved):
            layer.task, layer.last_aux = task, last_aux
            layer.usage.copy_(usage)
            layer.dropped.copy_(dropped)
            layer.assigned.copy_(assigned)


__all__ = ['run_block']
