import pytest
import torch

from mtvision.engine import Trainer


@pytest.fixture
def tiny_run(tiny_config, tmp_path):
    """A 1-iteration quick start on the tiny data, evaluated at its end: (work dir, config)."""
    torch.manual_seed(0)
    cfg = tiny_config(**{'train_cfg.max_iters': 1, 'train_cfg.val_interval': 1, 'train_cfg.val_at_start': False,
                         'checkpoint_cfg.interval': 1})
    Trainer(cfg, tmp_path / 'run').train()
    return tmp_path / 'run', cfg
