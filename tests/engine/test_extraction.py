from pathlib import Path

import pytest
import torch

from mtvision.config import load_config
from mtvision.engine import Trainer, build_model, load_weights
from mtvision.engine.evaluator import val_loader
from mtvision.models.moe import MoEMlp
from mtvision.tasks import build_tasks

ROOT = Path(__file__).resolve().parents[2]
MOE_QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8-moe-e8_4task_synthetic.py'


def test_extracted_task_model_is_smaller_loads_alone_and_matches_the_full_model(tiny_config, tmp_path, load_tool):
    cfg = tiny_config(MOE_QUICKSTART, **{'model.backbone.moe.num_experts': 8, 'model.backbone.moe.noise_std': 0.5,
                                         'model.backbone.depth': 4, 'train_cfg.max_iters': 3})
    trainer = Trainer(cfg, tmp_path / 'run', validate=False)
    trainer.train()
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
