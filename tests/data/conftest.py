from pathlib import Path

import pytest

from mtvision.data.synthetic import generate_synthetic

TINY = dict(seed=3, num_train=6, num_val=6, image_size=64, num_classes=6)


@pytest.fixture(scope='session')
def tiny_default(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny synthetic dataset in the default layout (one image set per task), written once per session."""
    root = tmp_path_factory.mktemp('synthetic') / 'default'
    return root, generate_synthetic(root, **TINY)


@pytest.fixture(scope='session')
def tiny_shared(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny synthetic dataset in the shared-images layout."""
    root = tmp_path_factory.mktemp('synthetic') / 'shared'
    return root, generate_synthetic(root, **TINY, shared_images=True)
