import importlib.util
import logging
from pathlib import Path

import pytest

from mtvision.config import load_config
from mtvision.data.synthetic import generate_synthetic

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8_4task_synthetic.py'
TINY_MODEL = {'model.backbone.embed_dim': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2}


@pytest.fixture(scope='session')
def load_tool():
    """``load_tool(name)``: the script ``tools/<name>.py`` imported as a module (its ``main`` and ``parse_args``),
    e.g. ``load_tool('check_data')``, ``load_tool('model_converters/timm_to_mtvision')``. Each call executes the
    script anew, so module-level lookups see the patches in force at that moment."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f'tool_{name.replace("/", "_")}', ROOT / 'tools' / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


def plant_marker(path: str) -> None:
    """What a malicious checkpoint would run on load: here, only create a file that proves it ran."""
    Path(path).write_text('the pickle ran')


class CodeRunningPickle:
    """Unpickles by calling ``plant_marker(marker)``: the classic code-execution pickle. ``PLANTED`` is the global
    a scan of its pickle names."""

    PLANTED = f'{plant_marker.__module__}.{plant_marker.__qualname__}'

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return plant_marker, (str(self.marker),)


@pytest.fixture(autouse=True)
def restore_logging():
    """The 'mtvision' logger as it was before the test: tools and setup_logging replace its handlers (a console
    stream pytest closes after the test, a train.log file), so the test's are closed and the old ones put back.
    Every test gets it: a handler left on a closed stream makes later tests' log records fail."""
    package = logging.getLogger('mtvision')
    handlers, level = list(package.handlers), package.level
    yield
    for handler in list(package.handlers):
        package.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    package.handlers[:], package.level = handlers, level


@pytest.fixture(scope='session')
def code_running_pickle() -> type[CodeRunningPickle]:
    """``code_running_pickle(marker)``: an object whose unpickling creates the file ``marker``."""
    return CodeRunningPickle


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset at ``<tmp>/data`` (configs' ``data/synthetic``) and its shared-image layout beside
    it at ``<tmp>/data_shared`` (configs' ``data/synthetic_shared``), so one repointing serves both."""
    root = tmp_path_factory.mktemp('synthetic') / 'data'
    generate_synthetic(root, seed=1, num_train=8, num_val=6, image_size=64, num_classes=6)
    generate_synthetic(root.with_name('data_shared'), seed=1, num_train=8, num_val=6, image_size=64, num_classes=6,
                       shared_images=True)
    return root


def _repoint(value, data_root: Path):
    """The quick-start config with its data paths moved to ``data_root``."""
    if isinstance(value, dict):
        return {k: _repoint(v, data_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_repoint(v, data_root) for v in value]
    if isinstance(value, str) and value.startswith('data/synthetic'):
        return str(data_root) + value[len('data/synthetic'):]
    return value


@pytest.fixture
def tiny_config(tiny_data):
    """A config (the quick start's by default) on the tiny dataset, with a tiny backbone (``tiny_model``: options
    that shrink it; the default shrinks a ViT) and batch size 2."""
    def make(config=QUICKSTART, tiny_model=TINY_MODEL, **options):
        cfg = load_config(str(config), {**tiny_model, 'log_cfg.tensorboard': False, 'log_cfg.visualize': False,
                                            'log_cfg.interval': 1, **options})
        cfg.tasks = _repoint(cfg.to_dict()['tasks'], tiny_data)
        for task in cfg.tasks.values():
            task.val_batch_size = 4
            if not task.get('group'):  # a group's tasks take its batch size
                task.batch_size = 2
        if cfg.get('task_groups'):
            cfg.task_groups = _repoint(cfg.to_dict()['task_groups'], tiny_data)
            for group in cfg.task_groups.values():
                group.batch_size = 2
        cfg.synthetic_data = None
        return cfg
    return make
