"""Optional experiment trackers beside ``scalars.jsonl`` and TensorBoard: Weights & Biases and MLflow.

Off by default and not installed with mtvision; a config asks for them in ``log_cfg.backends``, one dict each, the
library imported only then::

    log_cfg = dict(backends=[
        dict(type='wandb', project='mtvision', entity='my-team'),   # further keys go to wandb.init
        dict(type='mlflow', experiment_name='mtvision', tracking_uri='file:///data/mlruns'),  # run_name, tags too
    ])

Rank 0 logs every scalar of ``scalars.jsonl`` (training losses, timings, ``val/<task>/<metric>``) at its iteration,
and the config once. Each tracker's run id is kept in the run folder (``wandb_run_id``, ``mlflow_run_id``), so a
resumed run, which continues its run folder, continues the same tracker run. Steps the interrupted run logged after
its checkpoint stay in the tracker: wandb ignores steps before its last one, MLflow keeps both values.
"""
import importlib
import inspect
from pathlib import Path
from types import ModuleType


def require(module: str, what: str) -> ModuleType:
    """``import module``, or an ImportError naming ``what`` needs it and the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise  # the library is there but one of its own imports failed: its error says which
        raise ImportError(f'{what} needs the {module} package, which is not installed: pip install {module}') \
            from error


class _Backend:
    """A tracker run of one run folder: ``log(step, scalars)``, ``close()``. Subclasses set ``name`` (the
    ``type`` in ``log_cfg.backends`` and the pip package) and start or continue their run in ``__init__``."""

    name = ''

    def __init__(self, run_dir: Path, config: dict | None, resumed: bool, what: str):
        self.module = require(self.name, what)
        self.id_file = run_dir / f'{self.name}_run_id'
        self.resumed_id = self.id_file.read_text().strip() if resumed and self.id_file.is_file() else None

    def _keep_id(self, run_id: str) -> None:
        self.id_file.write_text(run_id + '\n')

    def log(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class WandbBackend(_Backend):
    """``wandb.init(**options)`` with the run folder as ``dir``, the work dir and run folder as the run's ``name``
    (unless given) and the config; on resume, the same run id with ``resume='allow'``."""

    name = 'wandb'

    def __init__(self, run_dir: Path, config: dict | None, resumed: bool, what: str, **options):
        super().__init__(run_dir, config, resumed, what)
        options.setdefault('name', f'{run_dir.parent.name}/{run_dir.name}')
        options.setdefault('dir', str(run_dir))
        if self.resumed_id:
            options.update(id=self.resumed_id, resume='allow')
        self.run = self.module.init(config=config, **options)
        self._keep_id(self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowBackend(_Backend):
    """An MLflow run in ``experiment_name`` (MLflow's default experiment without one) at ``tracking_uri`` (MLflow's
    default, ``./mlruns`` or ``MLFLOW_TRACKING_URI``, without one), named like wandb's unless ``run_name`` is given,
    with ``tags``; the config goes in as the artifact ``config.json``. On resume the same run is reopened."""

    name = 'mlflow'

    def __init__(self, run_dir: Path, config: dict | None, resumed: bool, what: str, experiment_name: str = None,
                 tracking_uri: str = None, run_name: str = None, tags: dict | None = None):
        super().__init__(run_dir, config, resumed, what)
        mlflow = self.module
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if experiment_name:
            mlflow.set_experiment(experiment_name)
        if self.resumed_id:
            self.run = mlflow.start_run(run_id=self.resumed_id)
        else:
            self.run = mlflow.start_run(run_name=run_name or f'{run_dir.parent.name}/{run_dir.name}', tags=tags)
            self._keep_id(self.run.info.run_id)
        if config is not None:
            mlflow.log_dict(config, 'config.json')

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.module.log_metrics(dict(scalars), step=step)

    def close(self) -> None:
        self.module.end_run()


BACKENDS = {backend.name: backend for backend in (WandbBackend, MlflowBackend)}


def check_backends(backends) -> None:
    """``log_cfg.backends`` is a list of dicts, each with a known ``type``: a ValueError naming the entry if not."""
    if not isinstance(backends, (list, tuple)):
        raise ValueError(f'log_cfg.backends must be a list of dicts, got {type(backends).__name__}')
    for index, options in enumerate(backends):
        if not isinstance(options, dict) or options.get('type') not in BACKENDS:
            raise ValueError(f'log_cfg.backends[{index}] must be a dict with type one of {sorted(BACKENDS)}, got '
                             f'{options!r}')


def build_backends(backends: list[dict], run_dir: str | Path, config: dict | None = None,
                   resumed: bool = False) -> list[_Backend]:
    """The trackers of ``log_cfg.backends`` for ``run_dir``, each started (or continued, when ``resumed``)."""
    check_backends(backends)
    built = []
    try:
        for index, options in enumerate(backends):
            options = dict(options)
            backend = BACKENDS[options.pop('type')]
            what = f"log_cfg.backends[{index}] (type='{backend.name}')"
            try:
                inspect.signature(backend).bind(run_dir, config, resumed, what, **options)
            except TypeError as error:
                raise ValueError(f'{what}: {error}') from None
            built.append(backend(Path(run_dir), config, resumed, what, **options))
    except BaseException:
        for backend in built:  # no tracker run is left open by a failed start
            backend.close()
        raise
    return built
