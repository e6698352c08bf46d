"""Merge fine-tuned models into one in weight space: model soups, task arithmetic, TIES-merging.

    python tools/merge_models.py SPEC [SPEC ...] --method {uniform,greedy,task-arithmetic,ties} --out DIR
                                 [--base SPEC] [--scale S | --scales S1 S2 ...] [--density 0.2]
                                 [--config CFG [CFG ...]]

Each SPEC is anything :func:`mtvision.zoo.resolve` reads: a work dir, a checkpoint directory, a weights file (with
``--config``: one config for every SPEC, or one per SPEC in order) or a zoo name. Their configs are read as
``load_model`` reads them (a checkpoint's stored config as data, never run). Methods (:mod:`mtvision.merging`):

- ``uniform``: the mean of the models (Wortsman et al. 2022, "Model soups").
- ``greedy``: the greedy soup: models ordered by their score on the validation sets, best first; each joins the
  soup when the soup's score does not drop. The models must be of the same tasks (fine-tunes of one recipe).
- ``task-arithmetic``: ``base + scale * sum_i (model_i - base)`` (Ilharco et al. 2023); needs ``--base``.
- ``ties``: TIES-merging (Yadav et al. 2023): task vectors trimmed to their ``--density`` share of largest
  magnitudes, a sign elected per weight, the agreeing values averaged, ``base + scale * merged``; needs ``--base``.

Heads are carried per task: the merged model has every task of the models, each head taken from the model that has
it (merged where several have it). The backbone configs must agree. ``--base`` is usually the pre-trained model the
others were fine-tuned from; a whole model, a backbone or weights in timm's layout.

The scale: ``--scale S`` uses S; otherwise each of ``--scales`` (default 0.1, 0.2, ..., 1.0 for task arithmetic, as
Ilharco et al. pick it on held-out validation data; 0.5, 0.6, ..., 1.5 for TIES, whose disjoint mean is an average
rather than a sum, so its scale sits near 1) is scored on the tasks' validation sets and the best is kept.

Selection score (greedy soup and the scale search): each task's primary metric (its metric's ``primary_key``:
top-1 for classification, box mAP for detection, mask mAP for instance segmentation, mIoU for segmentation, AbsRel
for depth, the mean angular error for normals, mAP for multi-label, MSE on the masked patches for MAE, retrieval
top-1 for contrastive) divided by the best value any single model reaches on that task, so 1 means as good as the
best model there; for metrics where lower is better (``higher_is_better = False``: AbsRel, angular error, MSE) the
ratio is inverted (best / value). The score is the mean over the tasks; a table of every candidate is printed.

With ``--base``, the task vectors' geometry over the backbone is printed first (``mtvision.merging
.task_vector_geometry``): each one's norm relative to the base's, and each pair's cosine and share of agreeing
signs. Large, nearly orthogonal vectors are what merging handles worst.

Output: ``DIR/merged.safetensors`` (its header names the backbone, so the probes read it alone) and ``DIR/merged.py``,
the merged model's config:

    python tools/test.py DIR/merged.py DIR/merged.safetensors
    python tools/knn.py DIR/merged.safetensors --config DIR/merged.py
    mtvision.load_model('DIR/merged.safetensors', config='DIR/merged.py')
"""
import argparse

TA_SCALES = tuple(round(0.1 * i, 1) for i in range(1, 11))
TIES_SCALES = tuple(round(0.1 * i, 1) for i in range(5, 16))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Merge fine-tuned models in weight space')
    parser.add_argument('specs', nargs='+', metavar='SPEC',
                        help='models to merge: work dir, checkpoint directory, weights file (with --config), zoo name')
    parser.add_argument('--method', required=True, choices=['uniform', 'greedy', 'task-arithmetic', 'ties'])
    parser.add_argument('--base', metavar='SPEC', help='the model the others were fine-tuned from (task-arithmetic, '
                                                       'ties)')
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument('--scale', type=float, help='the task vectors\' scale lambda (no search)')
    scale.add_argument('--scales', type=float, nargs='+', help='scales to score on the validation sets (default: '
                                                               f'{TA_SCALES} for task-arithmetic, {TIES_SCALES} for '
                                                               'ties)')
    parser.add_argument('--density', type=float, default=0.2, help='ties: share of each task vector kept (default '
                                                                   '0.2)')
    parser.add_argument('--config', nargs='+', metavar='CFG',
                        help='model config for SPECs without one: one for all, or one per SPEC')
    parser.add_argument('--out', required=True, help='output directory')
    return parser.parse_args(argv)


def _check_args(args) -> None:
    from_base = args.method in ('task-arithmetic', 'ties')
    if from_base and args.base is None:
        raise SystemExit(f'--method {args.method} needs --base: the model the others were fine-tuned from')
    if not from_base and (args.base is not None or args.scale is not None or args.scales is not None):
        raise SystemExit(f'--base, --scale and --scales are for task-arithmetic and ties, not {args.method}')
    if args.config is not None and len(args.config) not in (1, len(args.specs)):
        raise SystemExit(f'--config takes one config for all SPECs or one per SPEC; got {len(args.config)} for '
                         f'{len(args.specs)} SPECs')
    if args.method == 'greedy' and len(args.specs) < 2:
        raise SystemExit('a greedy soup needs at least two models')


def read_model(spec: str, config: str | None):
    """``(config, state)`` of a model to merge: the state holds the backbone and the heads it was saved with."""
    from mtvision.checkpoint import read_stored_config
    from mtvision.config import load_config
    from mtvision.zoo import resolve
    from mtvision.zoo.convert import is_timm_layout

    resolved = resolve(spec)
    if config is not None:
        cfg = load_config(config)
    elif resolved.entry is not None:
        cfg = load_config(str(resolved.entry.config_path))
    elif resolved.is_checkpoint:
        cfg = read_stored_config(resolved.path)  # data, checked for building: a checkpoint may come from anyone
    else:
        raise SystemExit(f'{spec!r} holds weights but no model config: pass --config, the config it was trained '
                         f'with')
    state = resolved.read_weights()
    if is_timm_layout(state):
        raise SystemExit(f'{spec!r} holds weights in timm\'s layout, without heads: the models to merge are '
                         f'mtvision models (a timm backbone can be the --base)')
    return cfg, state


def _flat(value, prefix: str = '') -> dict:
    if isinstance(value, dict):
        return {key: item for name, sub in value.items() for key, item in _flat(sub, f'{prefix}{name}.').items()}
    return {prefix[:-1]: value}


def merged_config(cfgs: list, names: list[str], states: list[dict]):
    """The first model's config with the tasks of every model (each task's config from the first model whose
    weights hold its head); the model configs (backbone and all but the heads) must agree."""
    from mmengine.config import Config

    from mtvision.config import to_plain

    plain = [to_plain(cfg.to_dict()) for cfg in cfgs]
    reference = _flat(plain[0]['model'], 'model.')
    for name, cfg in zip(names[1:], plain[1:]):
        own = _flat(cfg['model'], 'model.')
        differing = sorted(key for key in reference.keys() | own.keys() if reference.get(key) != own.get(key))
        if differing:
            shown = ', '.join(f'{key} ({reference.get(key)!r} vs {own.get(key)!r})' for key in differing[:10])
            raise SystemExit(f'the model configs of {names[0]} and {name} differ, so their weights cannot be merged: '
                             f'{shown}')
    tasks, groups = {}, {}
    for name, cfg, state in zip(names, plain, states):
        held = {key.split('.')[1] for key in state if key.startswith('heads.')}
        unknown = sorted(held - set(cfg['tasks']))
        if unknown:
            raise SystemExit(f'{name} holds heads of tasks its config lacks: {unknown}')
        for task in cfg['tasks']:
            if task in held:
                tasks.setdefault(task, cfg['tasks'][task])
        groups.update({key: value for key, value in (cfg.get('task_groups') or {}).items() if key not in groups})
    merged = dict(plain[0], tasks=tasks)
    used_groups = {task.get('group') for task in tasks.values()} - {None}
    if groups or 'task_groups' in merged:
        merged['task_groups'] = {key: value for key, value in groups.items() if key in used_groups} or None
    return Config(merged)


def base_state(spec: str, model) -> dict:
    """The base's weights, in timm's layout converted into ``model``'s backbone."""
    from mtvision.zoo import resolve
    from mtvision.zoo.convert import convert_timm_state_dict, is_timm_layout

    weights = resolve(spec).read_weights()
    if is_timm_layout(weights):
        return {f'backbone.{key}': value for key, value in convert_timm_state_dict(weights, model.backbone).items()}
    return weights


def normalised_score(value: float, best: float, higher_is_better: bool) -> float:
    """``value`` relative to ``best``: 1 when as good, below 1 when worse (``best / value`` when lower is
    better); a zero denominator (every model at 0, a perfect 0 error) counts 1 when ``value`` is as good."""
    import math

    if math.isnan(value):
        return 0.0
    numerator, denominator = (value, best) if higher_is_better else (best, value)
    if denominator > 0:
        return numerator / denominator
    return 1.0 if numerator >= denominator else 0.0


class Scorer:
    """Scores states of the merged model on the validation sets of its tasks (module docstring)."""

    def __init__(self, cfg, model, device):
        from mtvision.engine.evaluator import build_metric
        from mtvision.tasks import build_tasks

        tasks = build_tasks(cfg.tasks, train=False, groups_cfg=cfg.get('task_groups'))
        self.tasks = {name: task for name, task in tasks.items() if task.val_dataset is not None}
        if not self.tasks:
            raise SystemExit('no task has a validation set to score on: pass --scale, or merge uniformly')
        self.model, self.device = model, device
        metrics = {name: build_metric(task) for name, task in self.tasks.items()}
        self.primary = {name: (metric.primary_key, metric.higher_is_better) for name, metric in metrics.items()}
        self.best: dict[str, float] = {}

    def metrics(self, state: dict) -> dict[str, float]:
        """The primary metric of every task whose head ``state`` holds."""
        from mtvision.engine import evaluate
        from mtvision.zoo.convert import load_state

        load_state(self.model, state)
        held = {key.split('.')[1] for key in state if key.startswith('heads.')}
        results = evaluate(self.model.to(self.device), {name: task for name, task in self.tasks.items()
                                                        if name in held}, shard=False)
        return {name: float(values[self.primary[name][0]]) for name, values in results.items()}

    def reference(self, ingredient_metrics: list[dict[str, float]]) -> None:
        """The best value of any single model on each task: what the scores are normalised by."""
        for task, (_, higher) in self.primary.items():
            values = [metrics[task] for metrics in ingredient_metrics if task in metrics]
            if values:
                self.best[task] = max(values) if higher else min(values)

    def score(self, metrics: dict[str, float]) -> float:
        scores = [normalised_score(metrics[task], self.best[task], self.primary[task][1])
                  for task in self.best if task in metrics]
        return sum(scores) / len(scores) if scores else float('nan')


def score_table(rows: list[tuple[str, dict[str, float], float, str]], primary: dict) -> str:
    """Rows ``(candidate, primary metric per task, score, note)`` as a plain-text table."""
    from mtvision.engine.logging import text_table

    tasks = list(primary)
    header = ('candidate', *[f'{task} {primary[task][0]}{"" if primary[task][1] else " (lower better)"}'
                             for task in tasks], 'score', '')
    lines = [header] + [(name, *[f'{metrics[task]:.4g}' if task in metrics else '' for task in tasks],
                         f'{score:.4f}', note) for name, metrics, score, note in rows]
    return text_table(lines)


def geometry_table(geometry, names: list[str]) -> str:
    """The task vectors' backbone norms (relative to the base's) and pairwise cosines / sign agreement."""
    from mtvision.engine.logging import text_table

    header = ('task vector', '|tau| / |base|', *[f'cos, same sign ({j})' for j in range(len(names))])
    lines = [header] + [(f'({i}) {name}', f'{norm:.3f}', *[f'{cos:+.3f}, {agree:.2f}' for cos, agree in
                                                           zip(geometry.cosines[i], geometry.sign_agreement[i])])
                        for i, (name, norm) in enumerate(zip(names, geometry.relative_norms))]
    return text_table(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _check_args(args)
    from pathlib import Path

    import torch

    from mtvision import merging
    from mtvision.checkpoint import load_weights
    from mtvision.engine.logging import setup_logging, to_json
    from mtvision.fileio import save_weights_file
    from mtvision.models import backbone_config, build_model
    from mtvision.tasks import build_tasks

    setup_logging()
    configs = args.config or [None]
    configs = configs * len(args.specs) if len(configs) == 1 else configs
    cfgs, states = zip(*(read_model(spec, config) for spec, config in zip(args.specs, configs)))
    cfgs, states, names = list(cfgs), list(states), list(args.specs)
    cfg = merged_config(cfgs, names, states)  # the configs first: a differing key says more than the weights
    try:
        merging.check_mergeable(states, names)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    model = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
    base = base_state(args.base, model) if args.base else None
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    summary = dict(method=args.method)
    if base is not None:
        geometry = merging.task_vector_geometry(base, states)
        print(geometry_table(geometry, names))
        summary['task_vectors'] = geometry._asdict()

    def merge(scale: float) -> dict:
        if args.method == 'task-arithmetic':
            return merging.task_arithmetic(base, states, scale, names=[args.base, *names])
        return merging.ties_merge(base, states, args.density, scale, names=[args.base, *names])

    search = args.method == 'greedy' or (base is not None and args.scale is None)
    scorer = Scorer(cfg, model, device) if search else None
    rows = []
    if scorer is not None:
        ingredient_metrics = [scorer.metrics(state) for state in states]
        scorer.reference(ingredient_metrics)
        ingredient_scores = [scorer.score(metrics) for metrics in ingredient_metrics]
        rows += [(name, metrics, score, 'model') for name, metrics, score in
                 zip(names, ingredient_metrics, ingredient_scores)]
    try:
        if args.method == 'uniform':
            merged = merging.uniform_soup(states, names)
        elif args.method == 'greedy':
            tried = {}

            def score_fn(state: dict) -> float:
                metrics = scorer.metrics(state)
                tried[len(tried)] = metrics
                return scorer.score(metrics)
            soup = merging.greedy_soup(states, score_fn, names, ingredient_scores)
            kept = [soup.kept[0]]
            for (index, score, accepted), metrics in zip(soup.trials, tried.values()):
                label = 'soup of ' + ' + '.join(names[i] for i in kept + [index])
                rows.append((label, metrics, score, 'kept' if accepted else 'rejected'))
                kept += [index] if accepted else []
            merged = soup.state
            print(f'greedy soup of {[names[i] for i in soup.kept]} (score {soup.score:.4f})')
            summary.update(kept=[names[i] for i in soup.kept], score=soup.score)
        elif args.scale is not None:
            merged = merge(args.scale)
            summary.update(scale=args.scale)
        else:
            scales = args.scales or (TA_SCALES if args.method == 'task-arithmetic' else TIES_SCALES)
            candidates = []
            for scale in scales:
                metrics = scorer.metrics(merge(scale))
                candidates.append((scorer.score(metrics), scale))
                rows.append((f'scale {scale:g}', metrics, candidates[-1][0], ''))
            score, chosen = max(candidates, key=lambda item: item[0])  # the first of equal scores: the smallest
            rows = [row[:3] + ('chosen',) if row[0] == f'scale {chosen:g}' else row for row in rows]
            merged = merge(chosen)
            print(f'{args.method}: scale {chosen:g} chosen (score {score:.4f})')
            summary.update(scale=chosen, score=score)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if rows:
        print(score_table(rows, scorer.primary))
        summary['table'] = [dict(candidate=name, metrics=metrics, score=score, note=note)
                            for name, metrics, score, note in rows]
    load_weights(model, merged)  # the merged weights are a whole model of the merged config, strictly
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.dump(str(out / 'merged.py'))
    save_weights_file(out / 'merged.safetensors', merged, metadata={'backbone': to_json(backbone_config(cfg))})
    print(f'wrote {out / "merged.safetensors"} and {out / "merged.py"} (tasks {list(cfg.tasks)}): '
          f'python tools/test.py {out / "merged.py"} {out / "merged.safetensors"}')
    summary.update(tasks=list(cfg.tasks), weights=str(out / 'merged.safetensors'), config=str(out / 'merged.py'))
    return summary


if __name__ == '__main__':
    main()
