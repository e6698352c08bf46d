"""The training loop: iteration-based, every part built from the config, readable on one screen (``train``)."""
import contextlib
import copy
import logging
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from mtvision.checkpoint import (EMA_FILE, STATE_FILE, checkpoint_header, config_to_json, find_last_checkpoint,
                                 finish_checkpoint, load_training_state, load_weights, new_checkpoint_folder,
                                 read_shards, remove_partial_checkpoints, resolve_checkpoint,
                                 rng_state, save_checkpoint, set_rng_state, write_shard, write_text_atomic)
from mtvision.config import to_plain
from mtvision.data.batch_augments import augment_batches, batch_augment_for
from mtvision.data.collate import collate_fn_for, group_collate_fn
from mtvision.data.datasets import SkipBadSamples
from mtvision.data.loader import build_loader
from mtvision.data.mixer import TaskMixer
from mtvision.data.prefetch import DevicePrefetcher
from mtvision.data.sampler import InfiniteSampler
from mtvision.distributed import (GradientReducer, all_gather_objects, average_scalars_over_ranks, broadcast_module,
                                  is_main_process, max_over_ranks, rank_and_world, sum_over_ranks)
from mtvision.engine.evaluator import evaluate, inference_cfg, metrics_table
from mtvision.engine.flops import peak_flops, training_flops_per_image
from mtvision.engine.logging import RUN_KEY, IterationTimer, ScalarWriter, open_run_dir, to_json
from mtvision.engine.speed import apply_speed_settings, compile_backbone, ddp_options, fsdp_options
from mtvision.models.ema import ema_update
from mtvision.models.heads.protocols import MaskedImageHead, MomentumHead
from mtvision.models.moe import routing_scalars
from mtvision.models.multitask import MultiTaskModel, backbone_config, build_model
from mtvision.optim import auto_scaled_lr, build_optimizer, check_schedule, match_parameter_layouts, scheduled_lr
from mtvision.registry import AGGREGATORS
from mtvision.tasks import build_tasks
from mtvision.zoo.resolve import load_pretrained, resume_checkpoint

logger = logging.getLogger('mtvision')
OPTIMIZER_KEY_SEPARATOR = '::'  # between a parameter's name and its state entry in sharded optimizer files


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def shard_model(model: MultiTaskModel, options: dict | None = None) -> None:
    """FSDP2: shard every transformer block, every head and then the rest of the model over the ranks (each rank
    keeps 1/world of each parameter and gathers a unit's parameters just for its forward and backward); ``options``
    are ``fully_shard``'s (mixed precision, resharding, mesh: :func:`mtvision.engine.speed.fsdp_options`)."""
    options = options or {}
    for block in model.backbone.mlp_blocks():
        fully_shard(block, **options)
    for head in model.heads.values():
        fully_shard(head, **options)
    fully_shard(model, **options)


def check_fsdp(trainer: 'Trainer') -> None:
    """What FSDP training does not support yet, as errors naming the option."""
    if trainer.world_size < 2:
        raise ValueError('env_cfg.fsdp=True shards the model over the ranks: launch several with torchrun')
    if not trainer.aggregator.supports_accumulation or trainer.learned_weights:
        raise ValueError(f'env_cfg.fsdp=True supports the WeightedSum aggregator only, not '
                         f'{type(trainer.aggregator).__name__}')
    if trainer.model.momentum_backbones or trainer.cfg.get('ema_cfg'):
        raise ValueError('env_cfg.fsdp=True does not support momentum encoders (MoCo v3) or ema_cfg yet')


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
    loss_scale = optim_cfg.get('loss_scale', 'dynamic')
    if loss_scale != 'dynamic' and not isinstance(loss_scale, dict):
        raise ValueError(f"optim_wrapper.loss_scale must be 'dynamic' or a dict of GradScaler arguments "
                         f"(init_scale, growth_factor, backoff_factor, growth_interval), got {loss_scale!r}")
    scaler_args = {} if loss_scale == 'dynamic' else dict(loss_scale)
    scaler = torch.amp.GradScaler(device.type, **scaler_args) if dtype == 'float16' else None
    return dict(device_type=device.type, dtype=getattr(torch, dtype)), scaler


class Trainer:
    """Builds the run described by ``cfg`` and trains it.

    Args:
        cfg: a checked config (``mtvision.config.load_config``).
        work_dir: where checkpoints, logs, metrics and pictures go.
        resume: ``'auto'`` (the work dir's last checkpoint, if any), a checkpoint directory or work dir, or None
            (:func:`mtvision.zoo.resume_checkpoint`).
        load_from: weights to start from: anything :func:`mtvision.zoo.resolve` takes (a checkpoint, work dir,
            weights file, URL, zoo name or ``timm:<name>@<file>``), loaded as ``get_model`` loads them
            (:func:`mtvision.zoo.load_pretrained`); ignored when resuming. A file in timm's layout is
            converted into the backbone, a file of backbone weights only (``backbone.*`` names) initialises the
            backbone, and either leaves the heads fresh. Dense weights into a model with MoE layers are upcycled:
            every expert starts as the dense MLP.
        validate: evaluate during training.
        run_dir: the folder of this run's logs (rank 0; ``mtvision.engine.logging.open_run_dir``); by default a new
            folder of the work dir, or when resuming the folder of the run that wrote the checkpoint.
    """

    def __init__(self, cfg: Config, work_dir: str | Path, resume: str | None = None, load_from: str | None = None,
                 validate: bool = True, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.validate = validate
        self.rank, self.world_size = rank_and_world()
        self.is_main = is_main_process()
        self._prepare_work_dir()
        self._read_loop_settings()
        self._build()
        checkpoint = self._agreed_checkpoint(resume)
        state = self._restore(checkpoint, resume, load_from)
        self._distribute()
        if state is not None:
            self._load_optimizer_state(state['optimizer'], resolve_checkpoint(checkpoint))
        self._build_weight_average(checkpoint)
        self._build_logging(checkpoint, run_dir)

    def _build_logging(self, checkpoint: Path | None, run_dir: str | Path | None) -> None:
        """The run's log folder and scalar writer (rank 0) and the iteration timer."""
        self.run_dir = (Path(run_dir) if run_dir else open_run_dir(self.work_dir, checkpoint)) if self.is_main else None
        self.scalars = ScalarWriter(self.run_dir, resume_step=self.step if checkpoint else None,
                                    tensorboard=self.log_cfg['tensorboard'], backends=self.log_cfg.get('backends'),
                                    config=to_plain(self.cfg)) if self.is_main else None
        self.timer = IterationTimer(self.world_size, self.device, training_flops_per_image(self.model),
                                    peak_flops(self.device, self.cfg.get('env_cfg', {}).get('peak_tflops')))

    def _prepare_work_dir(self) -> None:
        if self.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_partial_checkpoints(self.work_dir)
            if removed:
                logger.info('removed %d partial checkpoint writes of an interrupted run: %s', len(removed),
                            [path.name for path in removed])

    def _read_loop_settings(self) -> None:
        """Seed, iterations, intervals, accumulation, checkpoint and log settings of ``train_cfg`` and friends."""
        cfg = self.cfg
        randomness = cfg.get('randomness', {})
        self.seed = randomness.get('seed', 0)
        self.deterministic = randomness.get('deterministic', False)
        seed_everything(self.seed, self.deterministic)
        train_cfg = cfg.get('train_cfg', {})
        self.max_iters = train_cfg.get('max_iters', 1000)
        self.val_interval = train_cfg.get('val_interval', self.max_iters)
        self.val_at_start = train_cfg.get('val_at_start', False)
        self.accumulate_steps = train_cfg.get('accumulate_steps', 1)
        self.max_nonfinite_steps = train_cfg.get('max_nonfinite_steps', 5)
        self.skip_bad_samples = train_cfg.get('skip_bad_samples', False)
        if self.accumulate_steps < 1 or self.max_nonfinite_steps < 1:
            raise ValueError(f'train_cfg.accumulate_steps ({self.accumulate_steps}) and max_nonfinite_steps '
                             f'({self.max_nonfinite_steps}) must be at least 1')
        self.checkpoint_cfg = {'interval': self.max_iters, 'max_keep': 2, 'save_last': True,
                               **cfg.get('checkpoint_cfg', {})}
        self.log_cfg = {'interval': 10, 'tensorboard': True, 'visualize': True, **cfg.get('log_cfg', {})}

    def _build(self) -> None:
        """Tasks, device, model, mixed precision, aggregator and mixer, as on every rank before any exchange."""
        cfg = self.cfg
        self.tasks = build_tasks(cfg.tasks, val=self.validate, groups_cfg=cfg.get('task_groups'))
        for task in self.tasks.values():  # a bad test_cfg fails now, not at the first evaluation
            inference_cfg(task)
        self.sources: dict[str, list[str]] = {}  # where training batches come from (a task, or a task group): its tasks
        for name, task in self.tasks.items():
            self.sources.setdefault(task.source, []).append(name)
        if self.skip_bad_samples:  # off by default: bad data is an error unless asked
            for names in self.sources.values():
                skipping = SkipBadSamples(self.tasks[names[0]].train_dataset)  # one per dataset, shared in a group
                for name in names:
                    self.tasks[name].train_dataset = skipping
        env_cfg = cfg.get('env_cfg', {})
        device = env_cfg.get('device', 'auto')
        if device == 'auto':
            device = f'cuda:{torch.cuda.current_device()}' if torch.cuda.is_available() else 'cpu'
        self.device = torch.device(device)
        logger.info(apply_speed_settings(env_cfg, self.deterministic))
        self.model = build_model(cfg, self.tasks).to(self.device)
        self._check_groups()
        if self.world_size > 1:
            # each rank its own stream (augmentations, masks, dropout) after the identical model initialisation
            seed_everything(self.seed + self.rank, self.deterministic)
        self._build_step_parts()
        sizes = {name: len(task.train_dataset) for name, task in self.tasks.items()}
        self.mixer = TaskMixer(list(self.tasks), sizes=sizes, **{'seed': self.seed, **to_plain(cfg.get('mixer', {}))})
        self.step = 0
        self.samples_drawn = {source: 0 for source in self.sources}  # per rank: each task's (group's) sampler position
        self.baseline_metrics = None
        self.skipped_steps = 0  # steps without an update: non-finite loss or gradient (grad scaler or not)
        self._nonfinite_in_a_row = 0
        self.stop_signal = None
        self.interrupted = False
        self.fsdp = bool(env_cfg.get('fsdp', False))
        if self.fsdp:
            check_fsdp(self)

    def _check_groups(self) -> None:
        """A task group shares one backbone forward: heads that need a forward of their own cannot join one."""
        for source, names in self.sources.items():
            for name in names if len(names) > 1 else ():
                head = self.model.heads[name]
                if isinstance(head, (MaskedImageHead, MomentumHead)):
                    raise ValueError(f'tasks.{name} is in task group {source!r}, whose tasks share one backbone '
                                     f'forward, but its head ({type(head).__name__}) needs a forward of its own '
                                     f'(masked images or a momentum backbone): train it as a task of its own')

    def _build_step_parts(self) -> None:
        """What a step needs besides the model: optimizer settings, mixed precision, clipping, the learning-rate
        schedule and the aggregator (with the loss weights it may learn)."""
        cfg = self.cfg
        optim_cfg = cfg.get('optim_wrapper', {})
        self.optim_cfg = to_plain(optim_cfg.get('optimizer', dict(type='AdamW')))
        self.autocast, self.scaler = amp_settings(optim_cfg, self.device)
        self.clip_grad = optim_cfg.get('clip_grad')
        self.schedule = to_plain(cfg.get('param_scheduler', []))
        check_schedule(self.schedule)
        self.aggregator = AGGREGATORS.build(
            to_plain(cfg.get('aggregator', dict(type='WeightedSum'))),
            default_args=dict(loss_weights={name: task.loss_weight for name, task in self.tasks.items()}))
        # loss weights some aggregators learn with the model
        self.learned_weights = self.aggregator.attach(self.model.backbone, self.device)
        if self.accumulate_steps > 1 and not self.aggregator.supports_accumulation:
            raise ValueError(f'aggregator {type(self.aggregator).__name__} does not support '
                             f'train_cfg.accumulate_steps={self.accumulate_steps}: its update is not a sum over '
                             f'micro-batches')

    def _restore(self, checkpoint: Path | None, resume: str | None, load_from: str | None) -> dict | None:
        """Resume from ``checkpoint`` (returns its training state), or start from ``load_from``'s weights."""
        state = self._resume(checkpoint) if checkpoint is not None else None
        if checkpoint is None and resume == 'auto':
            logger.warning('no checkpoint in %s to resume from: training starts from scratch', self.work_dir)
        if checkpoint is None and load_from:
            logger.info('loaded weights from %s: %s', load_from, load_pretrained(self.model, load_from))
            self.model.reset_momentum()  # a new run's momentum encoders start as copies of the loaded weights
        return state

    def _distribute(self) -> None:
        """Rank 0's weights on every rank, sharded under FSDP, compiled if asked; then the optimizer and the
        gradient exchange, built once the parameters are final (FSDP replaces them by sharded ones)."""
        cfg, env_cfg = self.cfg, self.cfg.get('env_cfg', {})
        broadcast_module(self.model)  # every rank starts from rank 0's weights
        if self.fsdp:
            shard_model(self.model, fsdp_options(env_cfg.get('fsdp_cfg'), self.world_size, self.device.type))
        compile_backbone(self.model.backbone, env_cfg)
        auto_scale_lr = to_plain(cfg.get('auto_scale_lr') or {})
        if auto_scale_lr:
            self.optim_cfg['lr'], message = auto_scaled_lr(
                self.optim_cfg, auto_scale_lr, self.world_size,
                {name: task.batch_size for name, task in self.tasks.items()}, self.accumulate_steps)
            logger.info(message)
        paramwise_cfg = to_plain(cfg.get('optim_wrapper', {}).get('paramwise_cfg'))  # fine-tuning: layer decay
        self.optimizer = build_optimizer(self.model, self.optim_cfg, paramwise_cfg)
        if self.learned_weights:
            self.optimizer.add_param_group(self.aggregator.param_group())
        self.base_lrs = [group['lr'] for group in self.optimizer.param_groups]
        # FSDP has its own exchange for the sharded parameters
        self.reducer = GradientReducer([p for p in self.model.parameters() if not isinstance(p, DTensor)]
                                       + self.learned_weights, **ddp_options(env_cfg.get('ddp_cfg')))

    def _build_weight_average(self, checkpoint: Path | None) -> None:
        ema_cfg = self.cfg.get('ema_cfg')
        self.ema_cfg = {'decay': 0.9998, 'evaluate': False, **ema_cfg} if ema_cfg else None
        self.ema_model = None
        if self.ema_cfg is not None:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
            ema_file = resolve_checkpoint(checkpoint) / EMA_FILE if checkpoint is not None else None
            if ema_file is not None and ema_file.is_file():
                load_weights(self.ema_model, ema_file)
            elif checkpoint is not None:
                logger.warning('%s holds no %s: the weight average restarts from the current weights', checkpoint,
                               EMA_FILE)

    def _agreed_checkpoint(self, resume: str | None) -> Path | None:
        """The checkpoint every rank resumes from: rank 0 decides (with ``'auto'``, its work dir's last checkpoint)
        and tells the others, which load the same name from their work dir (node-local work dirs, or a shared file
        system whose ``last_checkpoint`` another node sees stale, would otherwise leave ranks at different steps and
        hang the next collective). A rank that cannot read it stops every rank with an error naming it."""
        if resume is None:
            return None
        choice = None
        if self.is_main:
            try:
                found = resume_checkpoint(resume, self.work_dir)
                if found is not None:
                    inside = found.resolve().is_relative_to(self.work_dir.resolve())
                    choice = str(found.resolve().relative_to(self.work_dir.resolve()) if inside else found)
            except (OSError, ValueError) as error:  # told to every rank, so that none waits for the others
                choice = error
        choice = all_gather_objects(choice)[0]
        if isinstance(choice, BaseException):
            raise choice
        if choice is None:
            return None
        checkpoint = self.work_dir / choice
        readable = all_gather_objects((checkpoint / STATE_FILE).is_file())
        missing = [rank for rank, ok in enumerate(readable) if not ok]
        if missing:
            raise FileNotFoundError(f'rank 0 resumes from {checkpoint}, which ranks {missing} cannot read (their '
                                    f'work dir {self.work_dir} lacks it): give every rank the same work dir')
        return checkpoint

    def _check_same_step(self) -> None:
        steps = all_gather_objects(self.step)
        if len(set(steps)) > 1:
            raise RuntimeError(f'the ranks resumed at different iterations {steps} (rank i at steps[i]): their '
                               f'copies of the checkpoint differ; give every rank the same work dir')

    def _resume(self, checkpoint: str | Path) -> dict:
        """Restore everything but the optimizer (built afterwards) from ``checkpoint``; returns its training state."""
        checkpoint = resolve_checkpoint(checkpoint)
        load_weights(self.model, checkpoint)
        state = load_training_state(checkpoint)
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.mixer.load_state_dict(state['mixer'])
        self.step = state['step']
        self.samples_drawn = dict(state['samples_drawn'])
        self.baseline_metrics = state.get('baseline_metrics')
        self.skipped_steps = state.get('skipped_steps', 0)
        self.aggregator.load_state_dict(state.get('aggregator') or {})
        per_rank = state.get('rng_per_rank') or [state['rng']]
        if len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        else:
            logger.warning('the checkpoint holds the random states of %d ranks, this run has %d: each rank reseeds',
                           len(per_rank), self.world_size)
            seed_everything(self.seed + self.rank + self.step)
        self._check_same_step()
        logger.info('resumed from %s at iteration %d', checkpoint, self.step)
        return state

    def _load_optimizer_state(self, optimizer_state: dict, checkpoint: Path) -> None:
        if optimizer_state.get('sharded'):  # written as shards by a sharded run: put back together, keyed by name
            tensors = read_shards(checkpoint, 'optimizer')
            state: dict = {}
            for key, value in tensors.items():
                name, entry = key.rsplit(OPTIMIZER_KEY_SEPARATOR, 1)
                state.setdefault(name, {})[entry] = value
            optimizer_state = dict(state=state, param_groups=optimizer_state['param_groups'])
        if self.fsdp:  # a full (unsharded) state keyed by parameter names
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(optimizer_state)

    def _save_sharded(self, state: dict) -> Path | None:
        """A sharded run's checkpoint: every rank writes the shards of the weights and of the optimizer state it
        holds into the folder rank 0 made, and rank 0 completes it. No rank gathers the whole model."""
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)
        tensors = {f'{name}{OPTIMIZER_KEY_SEPARATOR}{entry}': value
                   for name, entries in optimizer['state'].items() for entry, value in entries.items()}
        state['optimizer'] = dict(sharded=True, param_groups=optimizer['param_groups'])
        folder = Path(all_gather_objects(str(new_checkpoint_folder(self.work_dir, self.step))
                                         if self.is_main else None)[0])
        error = None
        try:
            header = checkpoint_header(self.step, self._checkpoint_metadata())
            write_shard(folder, 'model', get_model_state_dict(self.model), header)
            write_shard(folder, 'optimizer', tensors)
        except OSError as raised:
            error = f'rank {self.rank}: {raised}'
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            if self.is_main:
                shutil.rmtree(folder, ignore_errors=True)
            raise OSError(f'cannot write the shards of iteration {self.step} to {folder}: {errors}')
        if not self.is_main:
            return None
        return finish_checkpoint(self.work_dir, self.step, folder, state, self.checkpoint_cfg['max_keep'])

    def _train_iterators(self) -> dict:
        """An endless loader per task (per task group: one for its tasks), starting at the sample the run draws
        next."""
        iterators = {}
        for i, (source, names) in enumerate(self.sources.items()):
            task = self.tasks[names[0]]
            collate_fn = group_collate_fn(source, [self.tasks[name] for name in names]) if task.group else \
                collate_fn_for(task)
            sampler = InfiniteSampler(len(task.train_dataset), seed=self.seed + i, rank=self.rank,
                                      world_size=self.world_size, start=self.samples_drawn[source])
            # its own generator: creating the iterator would otherwise draw from the global RNG, and a resumed
            # run (which creates it mid-stream) would then augment differently from the uninterrupted one
            # uint8 images from the workers (pinned on CUDA), copied and normalised on the device one batch ahead
            loader, normalization = build_loader(
                task.train_dataset, self.device, batch_size=task.batch_size, sampler=sampler,
                num_workers=task.num_workers, collate_fn=collate_fn, drop_last=True,
                generator=torch.Generator().manual_seed(self.seed + i + 1000 * self.rank))
            # MixUp, CutMix, random erasing: on the normalised device batch, when the step draws it
            iterators[source] = augment_batches(DevicePrefetcher(loader, self.device, normalization),
                                                batch_augment_for(task))
        return iterators

    def training_state(self) -> dict:
        """Everything a resume needs besides the weights; collective (every rank's random state is gathered). A
        sharded run's optimizer state is written as shards (``_save_sharded``)."""
        per_rank = all_gather_objects(rng_state())
        return dict(step=self.step, optimizer=None if self.fsdp else self.optimizer.state_dict(),
                    mixer=self.mixer.state_dict(),
                    samples_drawn=dict(self.samples_drawn), rng=per_rank[0], rng_per_rank=per_rank,
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    config=config_to_json(self.cfg), baseline_metrics=self.baseline_metrics,
                    skipped_steps=self.skipped_steps, aggregator=self.aggregator.state_dict())

    def _checkpoint_metadata(self) -> dict[str, str]:
        """The checkpoint header's entries: the backbone's config and, on rank 0, the run folder that wrote it (a
        resumed run continues that folder's logs)."""
        metadata = {'backbone': to_json(backbone_config(self.cfg))}
        if self.run_dir is not None:
            metadata[RUN_KEY] = self.run_dir.name
        return metadata

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0, and each rank its shards in a sharded run; every rank must call it). A failed
        write (full disk, unwritable folder) raises naming the folder, and the previous checkpoints stay as they
        were."""
        state = self.training_state()
        try:
            if self.fsdp:
                return self._save_sharded(state)
            if not self.is_main:
                return None
            return save_checkpoint(self.work_dir, self.step, self.model, state,
                                   max_keep=self.checkpoint_cfg['max_keep'],
                                   metadata=self._checkpoint_metadata(), ema_model=self.ema_model)
        except OSError as error:
            last = find_last_checkpoint(self.work_dir)
            raise OSError(error.errno, f'cannot write the checkpoint of iteration {self.step} to {self.work_dir}: '
                          f'{error.strerror or error}; the last complete checkpoint is '
                          f'{last if last else "none"}, unchanged') from error

    def evaluate(self, log_table: bool = True) -> dict:
        """Every task's metrics on its validation set (sharded over the ranks and merged); rank 0 records them,
        logs their table (unless ``log_table`` is False) and draws the pictures."""
        pictures = self.work_dir / 'pictures' if self.log_cfg['visualize'] and self.is_main else None
        if pictures is not None:
            pictures.mkdir(exist_ok=True)
        model = self.ema_model if self.ema_model is not None and self.ema_cfg['evaluate'] else self.model
        if model.is_moe:
            # count the routing of the validation data alone (training counts are read on logging steps)
            model.expert_statistics()
        # under FSDP every rank must run the same forwards: each evaluates the whole validation set
        results = evaluate(model, self.tasks, pictures, self.step, self.autocast, shard=not self.fsdp)
        scalars = {f'val/{task}/{k}': v for task, values in results.items() for k, v in values.items()}
        routing = model.expert_statistics() if model.is_moe else {}
        scalars.update(routing_scalars(routing, 'val/moe'))
        if not self.is_main:
            return results
        if routing and pictures is not None:
            from mtvision.visualization import save_expert_usage
            save_expert_usage(pictures / f'expert_usage_iter_{self.step}.png',
                              {layer: (stats['tasks'], stats['usage']) for layer, stats in routing.items()})
        self.scalars.write(self.step, scalars)
        self.scalars.write_metrics(self.step, results)
        if pictures is not None:
            from mtvision.visualization import save_loss_curves
            save_loss_curves(pictures / 'loss_curves.png', self.scalars.records)
        if log_table:
            logger.info('evaluation at iteration %d:\n%s', self.step, metrics_table(results, self.baseline_metrics))
        return results

    def train(self) -> dict:
        """Train to ``max_iters``; returns the last evaluation's metrics (empty without validation).

        SIGTERM and SIGINT end the run after the current step with a checkpoint (``interrupted`` is then True).
        """
        if self.validate and self.val_at_start and self.step == 0:
            self.baseline_metrics = self.evaluate()
        iterators = self._train_iterators()
        self.model.train()
        results = {}
        self.interrupted = False
        # only rank 0 draws a bar; elsewhere tqdm's own default (and its TQDM_DISABLE variable) decides
        bar = tqdm(total=self.max_iters, initial=self.step, desc='train', dynamic_ncols=True,
                   **({} if self.is_main else {'disable': True}))
        start_time = time.perf_counter()
        with _stop_on_signals(self), bar:  # the bar closes also when a step raises: no redraw after the error
            while self.step < self.max_iters:
                self.timer.start_step()
                lrs = [scheduled_lr(base, self.step, self.schedule) for base in self.base_lrs]
                for group, lr in zip(self.optimizer.param_groups, lrs):
                    group['lr'] = lr
                step_tasks = self.mixer.next_tasks()
                self.model.start_step(self.step, self.max_iters)  # schedules inside heads (DINO's temperature)
                losses, terms = self._forward_backward(step_tasks, iterators)
                applied = self._optimizer_step(losses, terms)
                self.step += 1
                if applied:
                    self.model.update_momentum(step_tasks, self.step, self.max_iters)
                    if self.ema_model is not None:
                        ema_update(self.ema_model, self.model, self.ema_cfg['decay'], copy_buffers=True)
                self.timer.end_step({source: self.tasks[names[0]].batch_size * self.accumulate_steps
                                     for source, names in self._step_sources(step_tasks).items()})
                bar.update()
                if self.step % self.log_cfg['interval'] == 0 or self.step == self.max_iters:
                    self._log(losses, terms, lrs[0], bar)
                if self.validate and (self.step % self.val_interval == 0 or self.step == self.max_iters):
                    # the last evaluation's table is logged once the bar has closed, as the screen's last lines
                    results = self.evaluate(log_table=self.step < self.max_iters)
                stop = self._stop_requested()
                if stop or self.step % self.checkpoint_cfg['interval'] == 0 or (
                        self.step == self.max_iters and self.checkpoint_cfg['save_last']):
                    self.save()
                if stop:
                    logger.info('%s: stopped at iteration %d with a checkpoint; --resume continues', stop, self.step)
                    self.interrupted = True
                    break
        logger.info('trained to iteration %d in %.1f s', self.step, time.perf_counter() - start_time)
        if self.is_main:
            self.scalars.close()
            if results:
                write_text_atomic(self.work_dir / 'metrics.json', to_json(
                    dict(step=self.step, metrics=results, untrained=self.baseline_metrics), indent=2))
            if results and self.step == self.max_iters:
                logger.info('final evaluation at iteration %d:\n%s', self.step,
                            metrics_table(results, self.baseline_metrics))
        return results

    def _exchanged_parameters(self, step_tasks: list[str]) -> list[torch.nn.Parameter]:
        """The parameters whose gradients the ranks exchange in a step of ``step_tasks`` (every rank draws the same
        tasks): all but the heads of absent tasks and FSDP's sharded ones, in the order the backward reaches them."""
        absent = {id(p) for name in self.tasks if name not in step_tasks for p in self.model.task_parameters(name)}
        params = [p for p in self.model.parameters() if id(p) not in absent and not isinstance(p, DTensor)]
        return params[::-1] + self.learned_weights

    def _forward_backward(self, step_tasks: list[str], iterators: dict) -> tuple[dict, dict]:
        """The step's task losses (for logging) and named terms; gradients written, averaged over the ranks.

        With ``accumulate_steps = k`` each task draws k batches and each batch's loss is divided by k; the ranks
        exchange gradients once, during the last backward (what DDP's ``no_sync`` does for the first k - 1).
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.reducer.prepare(self._exchanged_parameters(step_tasks))
        shared_params = list(self.model.shared_parameters())
        task_params = {name: list(self.model.task_parameters(name)) for name in step_tasks}
        sources = self._step_sources(step_tasks)
        self.timer.start_data()
        # (host batch, device batch) pairs: the loss normalisers count the host targets, without a device sync
        pairs = {source: [next(iterators[source]) for _ in range(self.accumulate_steps)] for source in sources}
        self.timer.end_data()
        for source, names in sources.items():
            self.samples_drawn[source] += self.tasks[names[0]].batch_size * self.accumulate_steps  # drop_last: full
        batches = {name: [self._task_batch(host, name) for host, _ in pairs[self.tasks[name].source]]
                   for name in step_tasks}
        normalizers = self._loss_normalizers(batches)
        total_losses: dict = {}
        for micro_step in range(self.accumulate_steps):
            losses, terms = {}, {}  # terms stay tensors: read back (a device sync) only on logging steps
            capture = self.model.capturing_features() if self.aggregator.needs_features else contextlib.nullcontext()
            with capture as features:
                task_terms = {}
                for source, names in sources.items():
                    batch = pairs[source][micro_step][1]
                    with torch.autocast(**self.autocast):
                        if self.tasks[names[0]].group:  # one backbone forward for the group's tasks
                            task_terms.update(self.model.group_losses(names, batch, normalizers))
                        else:
                            task_terms[names[0]] = self.model.loss(names[0], batch, normalizer=normalizers.get(
                                names[0]))
                for name in step_tasks:
                    losses[name] = torch.stack([term.float() for term in task_terms[name].values()]).sum()
                    terms.update({f'{name}/{term}': value.detach() for term, value in task_terms[name].items()})
            for name, term in self.model.cross_task_losses().items():  # MoE mutual information
                losses[name] = losses[name] + term.float()
                terms[f'{name}/loss_moe_mi'] = term.detach()
            scale = 1.0 / self.accumulate_steps
            scaled = {name: loss * scale for name, loss in losses.items()}
            factor = scale  # what the losses handed to the aggregator are multiplied by
            if self.scaler is not None:
                scaled = {name: self.scaler.scale(loss) for name, loss in scaled.items()}
                # as a device tensor: the grad scaler's scale joins it without a read back to the host
                factor = self.scaler.scale(torch.full((), scale, device=self.device))
            last = micro_step == self.accumulate_steps - 1
            exchange = self.reducer.overlap(losses.values(), self.learned_weights) \
                if last and self.aggregator.overlaps_exchange else contextlib.nullcontext()
            with exchange:
                terms.update(self.aggregator.backward(scaled, shared_params, task_params, scale=factor,
                                                     features=features))
            for name, loss in losses.items():
                total_losses[name] = total_losses.get(name, 0.0) + loss.detach() * scale
        self.reducer.finish(self.aggregator.synchronized_parameters())
        return total_losses, terms

    def _step_sources(self, step_tasks: list[str]) -> dict[str, list[str]]:
        """The step's batch sources (tasks, task groups) and the step's tasks each feeds, in the step's order."""
        sources: dict[str, list[str]] = {}
        for name in step_tasks:
            sources.setdefault(self.tasks[name].source, []).append(name)
        return sources

    def _task_batch(self, batch: dict, name: str) -> dict:
        """Task ``name``'s view of a batch of its source: a group's batch holds each task's targets by task."""
        if self.tasks[name].group is None:
            return batch
        return dict(batch, targets=batch['targets'][name])

    def _loss_normalizers(self, batches: dict[str, list]) -> dict[str, torch.Tensor]:
        """Per task whose loss averages over a data-dependent count (valid pixels, positive points), the divisor
        that makes the update of the step's micro-batches on every rank the update of one batch holding them all:
        the count over all of them, divided by the number of partial losses (ranks x micro-batches) whose
        gradients are averaged. Counted from the targets on the host, summed over the ranks in one collective."""
        counts = {}
        for name, task_batches in batches.items():
            per_batch = [self.model.loss_normalizer(name, batch) for batch in task_batches]
            if per_batch[0] is not None:
                counts[name] = torch.stack(per_batch).sum()
        if not counts:
            return {}
        stacked = torch.stack(list(counts.values())).double()
        if self.device.type == 'cuda':  # a copy from pageable memory would wait for the device
            stacked = stacked.pin_memory()
        totals = sum_over_ranks(stacked.to(self.device, non_blocking=True))
        partial_losses = self.world_size * self.accumulate_steps
        return {name: (total.clamp(min=1) / partial_losses).float() for name, total in zip(counts, totals)}

    def _optimizer_step(self, losses: dict, terms: dict) -> bool:
        """Clip and step; returns whether the weights changed.

        A non-finite loss or gradient skips the update on every rank alike (the reduced gradients agree). With a
        grad scaler (fp16) that is the scaler's usual skip and scale back-off, counted; without one, training stops
        after ``max_nonfinite_steps`` skipped steps in a row, with a ``FloatingPointError`` naming the tasks and
        terms: the weights, and so every checkpoint, hold only finite values.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in list(self.model.parameters()) + self.learned_weights if p.grad is not None]
        match_parameter_layouts(params)
        max_norm = self.clip_grad['max_norm'] if self.clip_grad else float('inf')
        norm_type = self.clip_grad.get('norm_type', 2.0) if self.clip_grad else 2.0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        terms['grad_norm'] = grad_norm
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step when a gradient is not finite
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale
            self.skipped_steps += not applied
            return applied
        # one host read per step (a device sync on GPU): the price of never stepping on a non-finite gradient
        finite = bool(torch.isfinite(torch.stack([grad_norm.float(), *losses.values()])).all())
        if finite:
            self.optimizer.step()
            self._nonfinite_in_a_row = 0
            return True
        self.skipped_steps += 1
        self._nonfinite_in_a_row += 1
        bad = {key: float(value) for key, value in terms.items() if not math.isfinite(float(value))}
        logger.warning('iteration %d: non-finite loss or gradient, update skipped (%d in a row): %s', self.step + 1,
                       self._nonfinite_in_a_row, bad)
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(f'{self._nonfinite_in_a_row} iterations in a row up to {self.step + 1} had a '
                                     f'non-finite loss or gradient; non-finite terms: {bad}. The weights hold the '
                                     f'last finite update; the last checkpoint is intact')
        return False

    def _log(self, losses: dict, terms: dict, lr: float, bar) -> None:
        values = {**terms, **{f'loss/{name}': loss for name, loss in losses.items()}}
        tensors = [key for key, value in values.items() if isinstance(value, torch.Tensor)]
        if tensors:  # one read back for all of them (a device sync each on GPU otherwise)
            read = torch.stack([values[key].detach().float().reshape(()) for key in tensors]).tolist()
            values.update(zip(tensors, read))
        values = {key: float(value) for key, value in values.items()}
        values = average_scalars_over_ranks(values)
        routing = routing_scalars(self.model.expert_statistics(), 'moe') if self.model.is_moe else {}
        # samples skipped as unreadable (skip_bad_samples), summed over the ranks
        skipped = average_scalars_over_ranks({name: task.train_dataset.skipped for name, task in self.tasks.items()
                                              if isinstance(task.train_dataset, SkipBadSamples)})
        skipped_samples = {f'data/skipped/{name}': count * self.world_size for name, count in skipped.items()}
        if not self.is_main:
            return
        scalars = dict(values, lr=lr, **routing)
        scalars['loss/total'] = sum(self.tasks[name].loss_weight * values[f'loss/{name}'] for name in losses)
        scalars.update({f'mixer/draws/{name}': count for name, count in self.mixer.draw_counts.items()})
        scalars['skipped_steps'] = self.skipped_steps
        scalars.update(skipped_samples)
        if self.scaler is not None:
            scalars['amp/loss_scale'] = self.scaler.get_scale()
        line, timing = self.timer.summary(self.step, self.max_iters, lr,
                                          {name: values[f'loss/{name}'] for name in losses})
        scalars.update(timing)
        self.scalars.write(self.step, scalars)
        logger.info(line)
        bar.set_postfix({name: f'{values[f"loss/{name}"]:.3f}' for name in losses}, refresh=False)

    def _stop_requested(self) -> str | None:
        """The signal that asked this run to stop, agreed by every rank (one rank's signal stops them all)."""
        signum = max_over_ranks(signal.Signals[self.stop_signal].value if self.stop_signal else 0)
        return signal.Signals(signum).name if signum else None


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT set ``trainer.stop_signal`` instead of killing the process, so the loop
    can finish its step and write a checkpoint (torchrun and job schedulers send SIGTERM before killing)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def handle(signum, frame) -> None:
        trainer.stop_signal = signal.Signals(signum).name

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
