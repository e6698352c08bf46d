"""The trainer on a CUDA device: fp16 with its grad scaler, bf16 autocast, and where each task's batch lands.

The CPU runs of the same code paths live in test_amp_and_faults.py and test_trainer.py; these need the device
(fp16 autocast, the CUDA caching allocator, host-to-device copies of every target format).
"""
import json
from pathlib import Path

import pytest
import torch

from mtvision.engine import Trainer

from mtvision.checkpoint import load_training_state, read_weights

ROOT = Path(__file__).resolve().parents[2]
MIXTURE = ROOT / 'configs' / 'mixture' / 'full-mixture_vit-tiny-p8_600it_synthetic.py'
ON_CUDA = {'env_cfg.device': 'cuda', 'train_cfg.val_interval': 1000, 'checkpoint_cfg.max_keep': 10}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA device (fp16 autocast, device copies of the batches)')


def classification_on_cuda(tiny_config, **options):
    cfg = tiny_config(**{**ON_CUDA, **options})
    cfg.tasks = {'cls': cfg.tasks['cls']}
    return cfg


def record_output_dtype(module: torch.nn.Module, seen: dict, key: str) -> None:
    module.register_forward_hook(lambda _module, _inputs, output: seen.setdefault(key, output.dtype) and None)


def test_fp16_grad_scaler_skips_the_step_with_an_overflowing_gradient_and_backs_off(tiny_config, tmp_path):
    cfg = classification_on_cuda(tiny_config, **{
        'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': 'float16',
        'optim_wrapper.loss_scale': dict(init_scale=1024.0), 'train_cfg.max_iters': 3, 'checkpoint_cfg.interval': 1})
    trainer = Trainer(cfg, tmp_path, validate=False)
    assert trainer.scaler is not None and trainer.device.type == 'cuda'
    seen = {}
    record_output_dtype(trainer.model.backbone.model.blocks[0].attn.qkv, seen, 'qkv')
    # the loss stays finite; one weight's gradient overflows in iteration 2 (0-based step 1)
    trainer.model.heads['cls'].fc.weight.register_hook(
        lambda grad: torch.full_like(grad, float('inf')) if trainer.step == 1 else grad)
    trainer.train()
    assert seen['qkv'] == torch.float16
    weights = [read_weights(tmp_path / f'iter_{i}') for i in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # iteration 2 changed nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # iteration 3 did
    scales = [load_training_state(tmp_path / f'iter_{i}')['scaler']['scale'] for i in (1, 2, 3)]
    assert scales == [1024.0, 512.0, 512.0] and trainer.skipped_steps == 1
    assert load_training_state(tmp_path / 'iter_3')['skipped_steps'] == 1


def test_bf16_losses_follow_the_fp32_run_without_a_grad_scaler(tiny_config, tmp_path):
    """Same seed, weights and batches in fp32 and under bf16 autocast: the losses agree to bf16's precision (8
    mantissa bits; a few steps of AdamW keep them close) and differ from fp32's, so bf16 did run."""
    steps = 3
    losses, dtypes = {}, {}
    for name, options in {'fp32': {}, 'bf16': {'optim_wrapper.type': 'AmpOptimWrapper',
                                               'optim_wrapper.dtype': 'bfloat16'}}.items():
        cfg = classification_on_cuda(tiny_config, **{'train_cfg.max_iters': steps, 'log_cfg.interval': 1,
                                                     **options})
        trainer = Trainer(cfg, tmp_path / name, validate=False)
        seen = {}
        record_output_dtype(trainer.model.backbone.model.blocks[0].attn.qkv, seen, 'qkv')
        trainer.train()
        assert trainer.scaler is None and trainer.skipped_steps == 0
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
        records = [json.loads(line) for line in (trainer.run_dir / 'scalars.jsonl').read_text().splitlines()]
        losses[name] = torch.tensor([record['loss/cls'] for record in records if 'loss/cls' in record])
        dtypes[name] = seen['qkv']
    assert dtypes == {'fp32': torch.float32, 'bf16': torch.bfloat16}
    assert len(losses['bf16']) == steps and torch.isfinite(losses['bf16']).all()
    torch.testing.assert_close(losses['bf16'], losses['fp32'], rtol=0.05, atol=0.0)
    assert not torch.equal(losses['bf16'], losses['fp32'])


def tensors_in(obj, path: str = '') -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with where it sits (``targets[1].boxes``)."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [found for key, value in obj.items() for found in tensors_in(value, f'{path}.{key}')]
    if isinstance(obj, (list, tuple)):
        return [found for i, value in enumerate(obj) for found in tensors_in(value, f'{path}[{i}]')]
    return []


def test_every_task_type_gets_its_batch_and_targets_on_the_device(tiny_config, tmp_path):
    """Classification, detection (a list of per-image box and label tensors), segmentation, depth, MAE and
    contrastive (two views): the batch the trainer hands to the model's loss holds only CUDA tensors."""
    cfg = tiny_config(MIXTURE, **{**ON_CUDA, 'train_cfg.max_iters': 1})
    trainer = Trainer(cfg, tmp_path, validate=False)
    batches = {}
    loss = trainer.model.loss

    def recording_loss(task, batch, normalizer=None):
        batches[task] = tensors_in(batch) + ([('normalizer', normalizer)] if normalizer is not None else [])
        return loss(task, batch, normalizer)
    trainer.model.loss = recording_loss
    trainer.train()
    assert trainer.step == 1
    types = {name: task.type for name, task in trainer.tasks.items()}
    assert sorted(types.values()) == sorted(['classification', 'detection', 'segmentation', 'depth', 'mae',
                                             'contrastive'])
    assert set(batches) == set(types)
    on_host = {task: [path for path, tensor in found if tensor.device.type != 'cuda'] for task, found in
               batches.items()}
    assert on_host == {task: [] for task in batches}
    assert any(path.startswith('.targets[1]') for path, _ in batches['det'])  # per-image targets were walked
