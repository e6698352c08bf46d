"""Per-task extraction of a mixture-of-experts model (Mod-Squad's pruning): measure which experts a task routes to,
keep those, write a smaller model for that task alone, loadable like any checkpoint, and fine-tune it briefly to
recover what pruning changed (Mod-Squad prunes, then tunes)."""
import copy
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from mmengine.config import Config

from mtvision.checkpoint import config_to_json, save_checkpoint
from mtvision.config import check_config, to_plain
from mtvision.data.prefetch import move_to
from mtvision.engine.logging import open_run_dir, setup_logging, to_json
from mtvision.engine.trainer import Trainer
from mtvision.models.moe import MoEMlp, experts_used
from mtvision.models.multitask import MultiTaskModel, backbone_config
from mtvision.task_types import task_type_spec

__all__ = ['changed_predictions', 'extract_task_model', 'finetune_config', 'finetune_task_model',
           'measure_expert_usage', 'save_task_model', 'shortened_schedule']

logger = logging.getLogger(__name__)


@torch.no_grad()
def measure_expert_usage(model: MultiTaskModel, task: str, batches: Iterable[dict]) -> dict[int, torch.Tensor]:
    """Token assignments per expert that ``task`` makes in each MoE block over ``batches`` (eval mode, no router
    noise): ``{block index: counts [E]}``, block indices as in the backbone's ``mlp_blocks()``."""
    if task not in model.heads:
        raise ValueError(f'unknown task {task!r}; the model has {list(model.heads)}')
    device = next(model.parameters()).device
    layers = {index: block.mlp for index, block in enumerate(model.backbone.mlp_blocks())
              if isinstance(block.mlp, MoEMlp)}
    if not layers:
        raise ValueError('the model has no mixture-of-experts layer to extract from')
    for layer in layers.values():
        layer.pop_statistics()  # start from zero
    was_training = model.training
    model.eval()
    for batch in batches:
        model.predict(task, move_to(batch, device)['images'])
    model.train(was_training)
    usage = {}
    for index, layer in layers.items():
        stats = layer.pop_statistics()
        usage[index] = stats['usage'][stats['tasks'].index(task)]
    return usage


def extract_task_model(model: MultiTaskModel, cfg: Config, task: str, usage: dict[int, torch.Tensor],
                       threshold: float = 0.0) -> tuple[MultiTaskModel, Config]:
    """``task``'s model: its head, the backbone with each MoE layer reduced to the experts whose share of the
    task's assignments is above ``threshold`` (0 keeps every expert the task used at all: the outputs on the task
    are then the full model's), and the config that builds it. ``model`` is not modified.

    The config lists the MoE blocks explicitly, with one expert count per block (``moe.num_experts`` as a list).
    """
    blocks = model.backbone.mlp_blocks()
    if sorted(usage) != [i for i, block in enumerate(blocks) if isinstance(block.mlp, MoEMlp)]:
        raise ValueError(f'usage covers blocks {sorted(usage)}, not the MoE blocks of the model')
    extracted = copy.deepcopy(model)
    for name in [name for name in extracted.heads if name != task]:
        del extracted.heads[name]
    for name in list(extracted.momentum_backbones):
        del extracted.momentum_backbones[name]
    extracted_blocks = extracted.backbone.mlp_blocks()
    kept_counts, capacity_factors = [], []
    for index in sorted(usage):
        layer = extracted_blocks[index].mlp
        keep = experts_used(usage[index], threshold)
        if int(keep.sum()) < layer.top_k:  # a token needs top_k experts: keep the most used ones
            keep = torch.zeros_like(keep)
            keep[usage[index].topk(layer.top_k).indices] = True
        extracted_blocks[index].mlp = layer.extract(task, keep)
        kept_counts.append(int(keep.sum()))
        capacity_factors.append(extracted_blocks[index].mlp.capacity_factor)
    extracted.is_moe = True

    plain = copy.deepcopy(cfg.to_dict())
    plain['tasks'] = {task: plain['tasks'][task]}
    moe = plain['model']['backbone']['moe']
    moe.update(blocks=sorted(usage), num_experts=kept_counts, upcycle=False)
    if moe.get('capacity_factor') is not None:
        moe['capacity_factor'] = capacity_factors
    plain['model']['backbone'].pop('tasks', None)
    return extracted, Config(plain)


def save_task_model(model: MultiTaskModel, cfg: Config, out_dir: str | Path, step: int = 0) -> Path:
    """Write ``out_dir/<task>.py`` (the config) and a checkpoint ``out_dir/iter_<step>/`` that training, test and
    probe tools load like any other."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (task,) = cfg.tasks
    config_path = out_dir / f'{task}.py'
    cfg.dump(str(config_path))
    save_checkpoint(out_dir, step, model, dict(step=step, config=config_to_json(cfg)),
                    metadata={'backbone': to_json(backbone_config(cfg))})
    logger.info('wrote %s and %s', config_path, out_dir / f'iter_{step}')
    return config_path


@torch.no_grad()
def changed_predictions(full: MultiTaskModel, extracted: MultiTaskModel, task: str, task_type: str,
                        batches: Iterable[dict]) -> float | None:
    """The share of ``task``'s predictions on ``batches`` that extraction changed, as the task type's spec compares
    them (``predictions_differ``): the class (classification), the pixel label (segmentation), the depth by more
    than 1% (depth); None for task types whose outputs (boxes, reconstructions, embeddings) have no one-to-one
    comparison."""
    predictions_differ = task_type_spec(task_type).predictions_differ
    if predictions_differ is None:
        return None
    changed = total = 0
    for batch in batches:
        before, after = (model.predict(task, batch['images']) for model in (full, extracted))
        differs = predictions_differ(before, after)
        changed += int(differs.sum())
        total += differs.numel()
    return changed / total if total else None


def shortened_schedule(phases: list[dict], iters: int) -> list[dict]:
    """``phases`` (``param_scheduler``, iteration-based) compressed into ``iters`` iterations: a leading warm-up
    (a ``LinearLR`` phase from iteration 0) lasts ``min(iters // 10, its length)`` and is dropped at 0; the phases
    after it keep their shape, their bounds moved proportionally from the rest of the schedule (up to its last
    phase's end) onto the rest of the ``iters`` iterations."""
    phases = [dict(phase) for phase in phases]
    if not phases:
        return []
    warmup_end = 0
    if phases[0]['type'] == 'LinearLR' and phases[0].get('begin', 0) == 0:
        warmup_end = phases[0]['end']
    warmup = min(iters // 10, warmup_end)
    schedule_end = max(phase['end'] for phase in phases)

    def moved(step: int) -> int:
        if schedule_end == warmup_end:
            return iters
        return warmup + round((step - warmup_end) * (iters - warmup) / (schedule_end - warmup_end))

    shortened = []
    if warmup_end:
        if warmup:
            shortened.append({**phases[0], 'end': warmup})
        phases = phases[1:]
    for phase in phases:
        shortened.append({**phase, 'begin': moved(phase.get('begin', 0)), 'end': moved(phase['end'])})
    return shortened


def finetune_config(cfg: Config, iters: int) -> Config:
    """``cfg`` (an extracted task model's) as a recovery fine-tune of ``iters`` iterations, changed as
    ``--cfg-options`` would change it: the schedule shortened (:func:`shortened_schedule`: the same optimizer and
    learning rate, a warm-up of ``min(iters // 10, the config's)``, then the config's decay), no evaluation before
    training, one checkpoint at the end."""
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f'fine-tune iterations must be a positive int, got {iters!r}')
    cfg = copy.deepcopy(cfg)
    cfg.merge_from_dict({
        'param_scheduler': shortened_schedule(to_plain(cfg.get('param_scheduler', [])), iters),
        'train_cfg.max_iters': iters, 'train_cfg.val_interval': iters, 'train_cfg.val_at_start': False,
        'checkpoint_cfg.interval': iters})
    check_config(cfg)
    return cfg


def finetune_task_model(cfg: Config, weights: str | Path, work_dir: str | Path, iters: int) -> MultiTaskModel:
    """Fine-tune the task model of ``cfg`` (one task, as :func:`extract_task_model` writes it) from ``weights`` for
    ``iters`` iterations on the task's training data (:func:`finetune_config`), writing the config, logs and the
    checkpoint ``iter_<iters>/`` into ``work_dir``; returns the fine-tuned model. ``weights`` are only read."""
    cfg = finetune_config(cfg, iters)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    run_dir = open_run_dir(work_dir)
    setup_logging(run_dir)
    for folder in (work_dir, run_dir):  # as tools/train.py leaves them: the work dir's latest config, the run's
        cfg.dump(str(folder / 'config.py'))
    try:
        trainer = Trainer(cfg, work_dir, load_from=str(weights), validate=False, run_dir=run_dir)
        trainer.train()
    finally:
        setup_logging()  # the run's train.log is complete: back to the console alone
    return trainer.model
