"""The training loop: iteration-based, every part built from the config, readable on one screen (``train``)."""
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from torch.utils.data import DataLoader
from tqdm import tqdm

from mtvision.config import to_plain
from mtvision.data.collate import COLLATE_FNS
from mtvision.data.mixer import TaskMixer
from mtvision.data.sampler import InfiniteSampler
from mtvision.engine.checkpoint import (find_last_checkpoint, load_training_state, load_weights, read_weights,
                                        resolve_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                        write_text_atomic)
from mtvision.engine.evaluator import evaluate, metrics_table, move_to
from mtvision.engine.logging import ScalarWriter, to_json
from mtvision.models.moe import upcycle_state_dict
from mtvision.models.multitask import MultiTaskModel
from mtvision.optim import build_optimizer, check_schedule, scheduled_lr
from mtvision.registry import AGGREGATORS, MODELS
from mtvision.tasks import Task, build_tasks

logger = logging.getLogger('mtvision')


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def routing_scalars(statistics: dict[str, dict], prefix: str) -> dict[str, float]:
    """Scalars of ``MultiTaskModel.expert_statistics()``: per layer and task the share of each expert
    (``{prefix}/{layer}/{task}/expert_{e}``), and per task the share of dropped assignments over all layers."""
    scalars, dropped, assigned = {}, {}, {}
    for layer, stats in statistics.items():
        for row, task in enumerate(stats['tasks']):
            kept = stats['usage'][row]
            if kept.sum() > 0:
                shares = kept / kept.sum()
                scalars.update({f'{prefix}/{layer}/{task}/expert_{e}': float(v) for e, v in enumerate(shares)})
            dropped[task] = dropped.get(task, 0) + int(stats['dropped'][row])
            assigned[task] = assigned.get(task, 0) + int(stats['assigned'][row])
    scalars.update({f'{prefix}/dropped/{task}': dropped[task] / assigned[task] for task in assigned if assigned[task]})
    return scalars


def backbone_config(cfg: Config) -> dict:
    """The backbone's config as built: with MoE layers, the task names they route are part of it."""
    backbone = to_plain(cfg.model.backbone)
    if backbone.get('moe'):
        backbone.setdefault('tasks', list(cfg.tasks))
    return backbone


def build_model(cfg: Config, tasks: dict[str, Task]) -> MultiTaskModel:
    model_cfg = to_plain(cfg.model)
    model_cfg.setdefault('type', 'MultiTaskModel')
    model_cfg['heads'] = {name: task.head for name, task in tasks.items()}
    return MODELS.build(model_cfg)


def amp_settings(optim_cfg: dict, device: torch.device) -> tuple[dict, torch.amp.GradScaler | None]:
    """``torch.autocast`` arguments and the grad scaler for ``optim_wrapper`` (``type='AmpOptimWrapper'``).

    fp16 needs a grad scaler (its range underflows small gradients); bf16 has fp32's range and needs none.
    The default dtype is fp16 on CUDA and bf16 elsewhere (CPUs have no fp16 matrix units).
    """
    if optim_cfg.get('type', 'OptimWrapper') == 'OptimWrapper':
        return dict(device_type=device.type, enabled=False), None
    if optim_cfg['type'] != 'AmpOptimWrapper':
        raise ValueError(f"optim_wrapper.type={optim_cfg['type']!r} is not 'OptimWrapper' or 'AmpOptimWrapper'")
    dtype = optim_cfg.get('dtype') or ('float16' if device.type == 'cuda' else 'bfloat16')
    if dtype not in ('float16', 'bfloat16'):
        raise ValueError(f"optim_wrapper.dtype={dtype!r} is not 'float16' or 'bfloat16'")
    scaler = torch.amp.GradScaler(device.type) if dtype == 'float16' else None
    return dict(device_type=device.type, dtype=getattr(torch, dtype)), scaler


class Trainer:
    """Builds the run described by ``cfg`` and trains it.

    Args:
        cfg: a checked config (``mtvision.config.load_config``).
        work_dir: where checkpoints, logs, metrics and pictures go.
        resume: ``'auto'`` (the work dir's last checkpoint, if any), a checkpoint path, or None.
        load_from: weights to start from (a checkpoint, work dir or weights file); ignored when resuming. Dense
            weights into a model with MoE layers are upcycled: every expert starts as the dense MLP.
        validate: evaluate during training.
    """

    def __init__(self, cfg: Config, work_dir: str | Path, resume: str | None = None, load_from: str | None = None,
                 validate: bool = True):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.validate = validate
        randomness = cfg.get('randomness', {})
        self.seed = randomness.get('seed', 0)
        seed_everything(self.seed, randomness.get('deterministic', False))
        train_cfg = cfg.get('train_cfg', {})
        self.max_iters = train_cfg.get('max_iters', 1000)
        self.val_interval = train_cfg.get('val_interval', self.max_iters)
        self.val_at_start = train_cfg.get('val_at_start', False)
        self.checkpoint_cfg = {'interval': self.max_iters, 'max_keep': 2, 'save_last': True,
                               **cfg.get('checkpoint_cfg', {})}
        self.log_cfg = {'interval': 10, 'tensorboard': True, 'visualize': True, **cfg.get('log_cfg', {})}

        self.tasks = build_tasks(cfg.tasks, val=validate)
        device = cfg.get('env_cfg', {}).get('device', 'auto')
        self.device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
        self.model = build_model(cfg, self.tasks).to(self.device)
        optim_cfg = cfg.get('optim_wrapper', {})
        self.autocast, self.scaler = amp_settings(optim_cfg, self.device)
        self.optimizer = build_optimizer(self.model, to_plain(optim_cfg.get('optimizer', dict(type='AdamW'))))
        self.base_lrs = [group['lr'] for group in self.optimizer.param_groups]
        self.clip_grad = optim_cfg.get('clip_grad')
        self.schedule = to_plain(cfg.get('param_scheduler', []))
        check_schedule(self.schedule)
        self.aggregator = AGGREGATORS.build(to_plain(cfg.get('aggregator', dict(type='WeightedSum'))), default_args=dict(
            loss_weights={name: task.loss_weight for name, task in self.tasks.items()}))
        sizes = {name: len(task.train_dataset) for name, task in self.tasks.items()}
        self.mixer = TaskMixer(list(self.tasks), sizes=sizes, **{'seed': self.seed, **to_plain(cfg.get('mixer', {}))})
        self.step = 0
        self.samples_drawn = {name: 0 for name in self.tasks}
        self.baseline_metrics = None

        checkpoint = find_last_checkpoint(self.work_dir) if resume == 'auto' else resume
        if checkpoint is not None:
            self._resume(checkpoint)
        elif resume == 'auto':
            logger.info('no checkpoint in %s: starting from scratch', self.work_dir)
        if checkpoint is None and load_from:
            weights, upcycled = upcycle_state_dict(read_weights(load_from), self.model)
            if upcycled:
                logger.info('upcycled the dense MLPs of %d blocks into MoE layers: %s', len(upcycled), upcycled)
            load_weights(self.model, weights)
            self.model.reset_momentum()  # a new run's momentum encoders start as copies of the loaded weights
            logger.info('loaded weights from %s', load_from)
        self.scalars = ScalarWriter(self.work_dir, resume_step=self.step if checkpoint else None,
                                    tensorboard=self.log_cfg['tensorboard'])

    def _resume(self, checkpoint: str | Path) -> None:
        checkpoint = resolve_checkpoint(checkpoint)
        load_weights(self.model, checkpoint)
        state = load_training_state(checkpoint)
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.mixer.load_state_dict(state['mixer'])
        self.step = state['step']
        self.samples_drawn = dict(state['samples_drawn'])
        self.baseline_metrics = state.get('baseline_metrics')
        set_rng_state(state['rng'])
        logger.info('resumed from %s at iteration %d', checkpoint, self.step)

    def _train_iterators(self) -> dict:
        """An endless loader per task, starting at the sample the run draws next."""
        iterators = {}
        for i, (name, task) in enumerate(self.tasks.items()):
            sampler = InfiniteSampler(len(task.train_dataset), seed=self.seed + i, start=self.samples_drawn[name])
            # its own generator: creating the iterator would otherwise draw from the global RNG, and a resumed
            # run (which creates it mid-stream) would then augment differently from the uninterrupted one
            loader = DataLoader(task.train_dataset, batch_size=task.batch_size, sampler=sampler,
                                num_workers=task.num_workers, collate_fn=COLLATE_FNS[task.type],
                                persistent_workers=task.num_workers > 0, drop_last=True,
                                generator=torch.Generator().manual_seed(self.seed + i))
            iterators[name] = iter(loader)
        return iterators

    def training_state(self) -> dict:
        return dict(step=self.step, optimizer=self.optimizer.state_dict(), mixer=self.mixer.state_dict(),
                    samples_drawn=dict(self.samples_drawn), rng=rng_state(),
                    scaler=self.scaler.state_dict() if self.scaler is not None else None, config=self.cfg.pretty_text,
                    baseline_metrics=self.baseline_metrics)

    def save(self) -> Path:
        return save_checkpoint(self.work_dir, self.step, self.model, self.training_state(),
                               max_keep=self.checkpoint_cfg['max_keep'],
                               metadata={'backbone': to_json(backbone_config(self.cfg))})

    def evaluate(self) -> dict:
        pictures = self.work_dir / 'pictures' if self.log_cfg['visualize'] else None
        if pictures is not None:
            pictures.mkdir(exist_ok=True)
        if self.model.is_moe:
            # count the routing of the validation data alone (training counts are read on logging steps)
            self.model.expert_statistics()
        results = evaluate(self.model, self.tasks, pictures, self.step, self.autocast)
        scalars = {f'val/{task}/{k}': v for task, values in results.items() for k, v in values.items()}
        if self.model.is_moe:
            routing = self.model.expert_statistics()
            scalars.update(routing_scalars(routing, 'val/moe'))
            if pictures is not None:
                from mtvision.visualization import save_expert_usage
                save_expert_usage(pictures / f'expert_usage_iter_{self.step}.png',
                                  {layer: (stats['tasks'], stats['usage']) for layer, stats in routing.items()})
        self.scalars.write(self.step, scalars)
        with open(self.work_dir / 'metrics.jsonl', 'a') as f:
            f.write(to_json({'step': self.step, **results}) + '\n')
        if pictures is not None:
            from mtvision.visualization import save_loss_curves
            save_loss_curves(pictures / 'loss_curves.png', self.scalars.records)
        logger.info('evaluation at iteration %d:\n%s', self.step, metrics_table(results, self.baseline_metrics))
        return results

    def train(self) -> dict:
        """Train to ``max_iters``; returns the last evaluation's metrics (empty without validation)."""
        if self.validate and self.val_at_start and self.step == 0:
            self.baseline_metrics = self.evaluate()
        iterators = self._train_iterators()
        shared_params = list(self.model.shared_parameters())
        task_batch_sizes = {name: task.batch_size for name, task in self.tasks.items()}
        self.model.train()
        results, losses = {}, {}
        bar = tqdm(total=self.max_iters, initial=self.step, desc='train', dynamic_ncols=True)
        start_time = time.perf_counter()
        while self.step < self.max_iters:
            lrs = [scheduled_lr(base, self.step, self.schedule) for base in self.base_lrs]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group['lr'] = lr
            losses, terms = {}, {}  # terms stay tensors: read back (a device sync) only on logging steps
            step_tasks = self.mixer.next_tasks()
            for name in step_tasks:
                batch = move_to(next(iterators[name]), self.device)
                self.samples_drawn[name] += task_batch_sizes[name]  # drop_last: every batch is full
                with torch.autocast(**self.autocast):
                    task_terms = self.model.loss(name, batch)
                losses[name] = torch.stack([term.float() for term in task_terms.values()]).sum()
                terms.update({f'{name}/{term}': value.detach() for term, value in task_terms.items()})
            for name, term in self.model.cross_task_losses().items():  # MoE mutual information
                losses[name] = losses[name] + term.float()
                terms[f'{name}/loss_moe_mi'] = term.detach()
            if not torch.isfinite(torch.stack(list(losses.values())).detach()).all():
                bad = [name for name, loss in losses.items() if not math.isfinite(loss.item())]
                raise FloatingPointError(f'non-finite loss at iteration {self.step} for tasks {bad}: '
                                         f'{ {key: value.item() for key, value in terms.items()} }')
            self.optimizer.zero_grad(set_to_none=True)
            scaled = {name: self.scaler.scale(loss) for name, loss in losses.items()} if self.scaler else losses
            scalars = self.aggregator.backward(scaled, shared_params)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.clip_grad:
                terms['grad_norm'] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips the step when a gradient is not finite
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            self.model.update_momentum(step_tasks, self.step, self.max_iters)
            bar.update()
            if self.step % self.log_cfg['interval'] == 0 or self.step == self.max_iters:
                scalars.update({key: value.item() for key, value in terms.items()}, lr=lrs[0])
                loss_values = {name: loss.item() for name, loss in losses.items()}
                scalars.update({f'loss/{name}': value for name, value in loss_values.items()})
                scalars['loss/total'] = sum(self.tasks[name].loss_weight * value for name, value in loss_values.items())
                scalars.update({f'mixer/draws/{name}': count for name, count in self.mixer.draw_counts.items()})
                if self.model.is_moe:
                    scalars.update(routing_scalars(self.model.expert_statistics(), 'moe'))
                self.scalars.write(self.step, scalars)
                bar.set_postfix({name: f'{value:.3f}' for name, value in loss_values.items()}, refresh=False)
            if self.validate and (self.step % self.val_interval == 0 or self.step == self.max_iters):
                results = self.evaluate()
            if self.step % self.checkpoint_cfg['interval'] == 0 or (
                    self.step == self.max_iters and self.checkpoint_cfg['save_last']):
                self.save()
        bar.close()
        logger.info('trained to iteration %d in %.1f s', self.step, time.perf_counter() - start_time)
        self.scalars.close()
        if results:
            write_text_atomic(self.work_dir / 'metrics.json', to_json(
                dict(step=self.step, metrics=results, untrained=self.baseline_metrics), indent=2))
        return results
