"""The shared-image config (one set of images labelled for segmentation, depth, normals and the classes it shows)
trains and is scored end to end with the two newer task types."""
import math

import torch

from mtvision.checkpoint import read_weights
from mtvision.engine import Trainer, metrics_table

SHARED = 'configs/shared/seg-depth-normals-tags_vit-tiny-p8_600it_synthetic.py'


def test_normals_and_multilabel_tasks_train_beside_seg_and_depth(tiny_config, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(SHARED, **{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'checkpoint_cfg.interval': 2,
                                 'train_cfg.val_at_start': False, 'log_cfg.visualize': True})
    before = {key: value.clone() for key, value in Trainer(cfg, tmp_path / 'init', validate=False).model.state_dict()
              .items()}
    torch.manual_seed(0)
    metrics = Trainer(cfg, tmp_path / 'run').train()
    assert set(metrics) == {'seg', 'depth', 'normals', 'tags'}
    normals, tags = metrics['normals'], metrics['tags']
    assert 0 <= normals['within_11.25'] <= normals['within_22.5'] <= normals['within_30'] <= 100
    assert 0 <= normals['median'] <= 180 and 0 <= normals['mean'] <= 180
    assert 0 <= tags['mAP'] <= 100 and not math.isnan(tags['f1_micro'])
    units = {tuple(line.split()[:3]) for line in metrics_table(metrics).splitlines()[2:]}
    assert {('normals', 'mean', 'deg'), ('normals', 'within_11.25', '%'), ('tags', 'f1_micro', '%')} <= units
    trained = read_weights(tmp_path / 'run')
    for head in ('normals', 'tags'):  # both new heads were updated by their losses
        names = [key for key in trained if key.startswith(f'heads.{head}.') and key in before]
        assert names and any(not torch.equal(trained[key], before[key]) for key in names), head
    pictures = sorted(path.name for path in (tmp_path / 'run').rglob('*.png'))
    assert any(name.startswith('normals') for name in pictures) and any(name.startswith('tags') for name in pictures)
