import hashlib
from pathlib import Path

import pytest
import torch

from mtvision.config import load_config
from mtvision.checkpoint import load_weights, read_weights
from mtvision.engine import Trainer
from mtvision.engine.evaluator import val_loader
from mtvision.engine.extraction import changed_predictions, finetune_config, shortened_schedule
from mtvision.models import build_model
from mtvision.models.moe import MoEMlp
from mtvision.optim.optimizer import scheduled_lr
from mtvision.tasks import build_tasks

ROOT = Path(__file__).resolve().parents[2]
MOE_QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8-moe-e8_4task_synthetic.py'


def train_tiny_moe(tiny_config, work_dir: Path) -> Trainer:
    """3 iterations of a 4-block MoE model (8 experts in blocks 1 and 3) on the tiny data, checkpointed in
    ``work_dir``; router noise spreads the tokens over the experts."""
    cfg = tiny_config(MOE_QUICKSTART, **{'model.backbone.moe.num_experts': 8, 'model.backbone.moe.noise_std': 0.5,
                                         'model.backbone.depth': 4, 'train_cfg.max_iters': 3})
    trainer = Trainer(cfg, work_dir, validate=False)
    trainer.train()
    return trainer


def test_extracted_task_model_is_smaller_loads_alone_and_matches_the_full_model(tiny_config, tmp_path, load_tool):
    trainer = train_tiny_moe(tiny_config, tmp_path / 'run')
    cfg = trainer.cfg
    extract = load_tool('extract_task_model')
    out = tmp_path / 'seg_only'
    summary = extract.main([str(tmp_path / 'run'), '--task', 'seg', '--out', str(out), '--batches', '2'])
    assert summary['parameters_after'] < summary['parameters_before']

    # built from its own config alone, strictly loaded, it computes what the full model computes for 'seg'
    extracted_cfg = load_config(str(out / 'seg.py'))
    assert list(extracted_cfg.tasks) == ['seg']
    assert list(extracted_cfg.model.backbone.moe.num_experts) == summary['kept']
    extracted = build_model(extracted_cfg, build_tasks(extracted_cfg.tasks, train=False, val=False)).eval()
    load_weights(extracted, out)
    full = trainer.model.eval()
    task = build_tasks({'seg': cfg.tasks['seg']}, train=False)['seg']
    for batch in val_loader(task):
        with torch.no_grad():
            torch.testing.assert_close(extracted.features('seg', batch['images']).maps[-1],
                                       full.features('seg', batch['images']).maps[-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(extracted('seg', batch['images']), full('seg', batch['images']),
                                       rtol=1e-4, atol=1e-5)
    layers = [block.mlp for block in extracted.backbone.mlp_blocks() if isinstance(block.mlp, MoEMlp)]
    assert [layer.num_experts for layer in layers] == summary['kept'] and all(layer.tasks == ('seg',)
                                                                               for layer in layers)

    # keeping every expert the task used costs nothing
    assert summary['changed'] == 0 and summary['metrics_extracted'] == pytest.approx(summary['metrics_full'])

    # a threshold above every share keeps only top_k experts per layer, and the report says what that costs: the
    # share of pixel labels that differ, counted here from the two models' outputs
    pruned_dir = tmp_path / 'pruned'
    summary = extract.main([str(tmp_path / 'run'), '--task', 'seg', '--out', str(pruned_dir), '--batches', '2',
                            '--threshold', '0.99'])
    assert summary['kept'] == [2, 2]  # MoE blocks 1 and 3
    pruned_cfg = load_config(str(pruned_dir / 'seg.py'))
    pruned = build_model(pruned_cfg, build_tasks(pruned_cfg.tasks, train=False, val=False)).eval()
    load_weights(pruned, pruned_dir)
    differing = pixels = 0
    for batch in val_loader(task):
        with torch.no_grad():
            labels = [model('seg', batch['images']).argmax(dim=1) for model in (full, pruned)]
        differing += int((labels[0] != labels[1]).sum())
        pixels += labels[0].numel()
    assert 0 < summary['changed'] == pytest.approx(differing / pixels)
    assert summary['metrics_full'].keys() == summary['metrics_extracted'].keys() == {'mIoU', 'mAcc', 'aAcc'}


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob('*')) if path.is_file()}


def test_finetune_trains_the_pruned_model_into_its_own_folder_and_reports_a_third_column(tiny_config, tmp_path,
                                                                                           load_tool):
    full_run = train_tiny_moe(tiny_config, tmp_path / 'run')
    extract = load_tool('extract_task_model')
    out = tmp_path / 'pruned'
    extract_only = extract.main([str(tmp_path / 'run'), '--task', 'seg', '--out', str(out), '--batches', '2',
                                 '--threshold', '0.99'])
    extracted_files = file_hashes(out)
    extracted_weights = read_weights(out / 'iter_3')

    # the same extraction again (it rewrites the same files), then 4 fine-tuning iterations
    summary = extract.main([str(tmp_path / 'run'), '--task', 'seg', '--out', str(out), '--batches', '2',
                            '--threshold', '0.99', '--finetune', '4'])
    assert summary['kept'] == extract_only['kept'] == [2, 2]  # used experts were dropped
    finetuned_files = {path: digest for path, digest in file_hashes(out).items() if not path.startswith('finetune/')}
    assert finetuned_files == extracted_files  # the extracted model is left as written
    finetune_dir = out / 'finetune'
    assert (finetune_dir / 'last_checkpoint').read_text().strip().endswith('iter_4')
    assert not (finetune_dir / 'iter_3').exists()  # one checkpoint, at the end of the fine-tune
    finetuned_weights = read_weights(finetune_dir / 'iter_4')
    assert finetuned_weights.keys() == extracted_weights.keys()  # the extracted model, no other task's head
    assert any(not torch.equal(finetuned_weights[name], extracted_weights[name]) for name in extracted_weights)
    finetuned_cfg = load_config(str(finetune_dir / 'config.py'))
    assert list(finetuned_cfg.tasks) == ['seg'] and finetuned_cfg.train_cfg.max_iters == 4

    assert summary['metrics_full'].keys() == summary['metrics_extracted'].keys() == \
        summary['metrics_finetuned'].keys() == {'mIoU', 'mAcc', 'aAcc'}
    assert summary['metrics_full'] == pytest.approx(extract_only['metrics_full'])
    assert summary['changed'] == pytest.approx(extract_only['changed'])
    # the fine-tuned model's changed share is counted against the full model, from the checkpoint it wrote
    finetuned = build_model(finetuned_cfg, build_tasks(finetuned_cfg.tasks, train=False, val=False)).eval()
    load_weights(finetuned, finetune_dir)
    task = build_tasks({'seg': full_run.cfg.tasks['seg']}, train=False)['seg']
    expected = changed_predictions(full_run.model.eval(), finetuned, 'seg', 'segmentation', val_loader(task))
    assert summary['changed_finetuned'] == pytest.approx(expected)


def test_finetune_schedule_keeps_the_shape_of_the_config_in_fewer_iterations(tiny_config):
    phases = [dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
              dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=50, end=600)]
    # a warm-up of min(iters // 10, the config's), then the cosine over the rest
    assert shortened_schedule(phases, 300) == [{**phases[0], 'end': 30}, {**phases[1], 'begin': 30, 'end': 300}]
    assert shortened_schedule(phases, 1000) == [phases[0], {**phases[1], 'begin': 50, 'end': 1000}]
    assert shortened_schedule(phases, 5) == [{**phases[1], 'begin': 0, 'end': 5}]  # too short for a warm-up
    # the shortened cosine is the config's, sampled at proportional points
    shortened = shortened_schedule(phases, 300)
    for step in (30, 100, 165, 299):
        config_step = 50 + (step - 30) * 550 / 270
        assert scheduled_lr(1.0, step, shortened) == pytest.approx(
            0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (config_step - 50) / 550)).item()), rel=1e-5)
    # the config's other settings are kept; only the run's length, evaluation and checkpoint change
    cfg = tiny_config(MOE_QUICKSTART)
    finetune = finetune_config(cfg, 300)
    assert finetune.optim_wrapper == cfg.optim_wrapper and finetune.tasks == cfg.tasks
    assert finetune.param_scheduler == shortened
    assert (finetune.train_cfg.max_iters, finetune.train_cfg.val_at_start, finetune.checkpoint_cfg.interval) == \
        (300, False, 300)
    with pytest.raises(ValueError, match='positive int'):
        finetune_config(cfg, 0)


def test_dense_checkpoint_upcycles_into_the_moe_model(tiny_config, tmp_path):
    dense_run = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'dense', validate=False)
    dense_run.train()
    cfg = tiny_config(MOE_QUICKSTART, **{'model.backbone.moe.num_experts': 4, 'train_cfg.max_iters': 1})
    moe_run = Trainer(cfg, tmp_path / 'moe', load_from=str(tmp_path / 'dense'), validate=False)
    dense, moe = dense_run.model.eval(), moe_run.model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for task in ('cls', 'depth'):
            torch.testing.assert_close(moe(task, images), dense(task, images), rtol=1e-4, atol=1e-5)
    expert_weights = moe.backbone.model.blocks[1].mlp.w1
    torch.testing.assert_close(expert_weights[3], dense.backbone.model.blocks[1].mlp.fc1.weight.t())
