"""Turn a training checkpoint into a published weights file and print its metafile entry.

    python tools/publish_model.py WORK_DIR_OR_CKPT --name NAME [--out DIR] [--date YYYYMMDD] [--collection NAME]
                                  [--config PATH] [--dataset TASK=NAME ...] [--url-base URL] [--mirror DIR]
                                  [--register ZOO_DIR]

Writes ``<out>/<name>_<date>-<sha256[:8]>.safetensors`` (mmpretrain's ``{name}_{date}-{sha8}`` pattern): the model
weights only, never the optimizer or any other training state, with the checkpoint's ``backbone`` header kept and
``format=mtvision`` and ``name`` added. When the run evaluated its EMA weights (``ema_cfg.evaluate``), those are the
ones published, since they are the ones its metrics measure.

Prints the ``Models`` entry for ``configs/<family>/metafile.yml``: ``Parameters`` counted on the model built from
the checkpoint's own config (the weights are loaded into it, strictly, as a check), ``Results`` from the run's
``metrics.json`` (rounded to 4 decimals; metrics without a value are left out) only when that file was written at the
checkpoint's iteration, ``Weights`` (``--url-base`` + file name) and the file's full SHA-256. ``--mirror DIR`` also
places a copy at ``DIR`` + the URL's path, the layout ``MTVISION_MIRROR=file://DIR`` resolves.

``--register ZOO_DIR`` also adds the entry to a user zoo, for a run of one's own (no tracked file edited): the
run's own config (the checkpoint's, as JSON data) goes to ``ZOO_DIR/<file stem>.json``, and the entry, with that
``Config``, ``Weights`` the published file's ``file://`` URL (or ``--url-base`` + file name, where given) and
collection "Registered runs" unless ``--collection`` names one, into ``ZOO_DIR/metafile.yml`` (an entry of the same
name is replaced). With ``ZOO_DIR`` in ``MTVISION_ZOO``, ``get_model(NAME, pretrained=True)`` builds the model and
loads the verified weights. The new metafile is checked as the zoo will read it (its schema, and names not taken
elsewhere in the zoo) before it replaces the old one.
"""
import argparse
import datetime
import hashlib
import json
import os
import shutil
import struct
import sys
import urllib.parse
from pathlib import Path

DEFAULT_URL_BASE = 'https://github.com/mtvision/mtvision/releases/download/v0.1.0/'
DEFAULT_COLLECTION = 'Quick start'
# a user zoo may not reuse a collection name of the repository's zoo
REGISTERED_COLLECTION = 'Registered runs'
METRIC_DECIMALS = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Publish a checkpoint as a weights file and print its metafile entry')
    parser.add_argument('checkpoint', help='a work dir (its last checkpoint) or a checkpoint directory iter_<N>/')
    parser.add_argument('--name', required=True, help='the model name, e.g. vit-tiny-p8_4task_600it_synthetic')
    parser.add_argument('--out', default='work_dirs/published', help='where the weights file goes')
    parser.add_argument('--date', help='YYYYMMDD in the file name (default: today, UTC)')
    parser.add_argument('--collection', help=f'the entry\'s "In Collection" (default: "{DEFAULT_COLLECTION}"; with '
                                             f'--register: "{REGISTERED_COLLECTION}")')
    parser.add_argument('--config', help='the entry\'s Config, relative to the repository root (default: the config '
                                         'path the run was started with, from env.json); not with --register')
    parser.add_argument('--dataset', nargs='+', default=[], metavar='TASK=NAME',
                        help='the Dataset of a task\'s results (default: synthetic/<task> for synthetic-data runs)')
    parser.add_argument('--url-base', help=f'the release URL the file will be served under (default: '
                                           f'{DEFAULT_URL_BASE}; with --register: the file\'s own file:// URL)')
    parser.add_argument('--mirror', help='also copy the file to MIRROR/<URL path> (a file:// mirror layout)')
    parser.add_argument('--register', metavar='ZOO_DIR',
                        help='add the entry and the run\'s config to the user zoo ZOO_DIR (ZOO_DIR/metafile.yml), '
                             'which get_model reads when ZOO_DIR is in MTVISION_ZOO')
    return parser.parse_args(argv)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sort_header_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors serialises the metadata from a hash map, whose order changes from one process to the next, so the
    same weights would get a different SHA-256 (and file name) on every run. Sorting makes publishing reproducible.
    """
    with open(path, 'r+b') as f:
        size = struct.unpack('<Q', f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw)
        header['__metadata__'] = dict(sorted(header.get('__metadata__', {}).items()))
        # serde_json's compact form; the header keeps its length (the same keys in another order), padding included
        new = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
        new += b' ' * (size - len(new))
        if len(new) != size or json.loads(new) != header:
            raise RuntimeError(f'{path}: cannot reorder the safetensors header in place')
        f.seek(8)
        f.write(new)


def task_display_name(task_type: str) -> str:
    """The model card's name of a task type (its spec's ``display_name``); an unregistered type keeps its name."""
    from mtvision.task_types import registered_task_types, task_type_spec

    return task_type_spec(task_type).display_name if task_type in registered_task_types() else task_type


def measured_results(metrics_file: Path, step: int, cfg, datasets: dict[str, str]) -> list[dict]:
    """``Results`` items from ``metrics.json`` if it was written at ``step``, else [] (with a note on stderr)."""
    if not metrics_file.is_file():
        print(f'note: no {metrics_file}; the entry has no Results', file=sys.stderr)
        return []
    record = json.loads(metrics_file.read_text())
    if record.get('step') != step:
        print(f'note: {metrics_file} holds the metrics of iteration {record.get("step")}, not of the published '
              f'iteration {step}; the entry has no Results', file=sys.stderr)
        return []
    results = []
    for task, metrics in record.get('metrics', {}).items():
        if task not in cfg.tasks:
            raise ValueError(f'{metrics_file}: task {task!r} is not in the checkpoint\'s config ({list(cfg.tasks)})')
        values = {key: round(float(value), METRIC_DECIMALS) for key, value in metrics.items() if value is not None}
        if not values:
            continue
        if task in datasets:
            dataset = datasets[task]
        elif cfg.get('synthetic_data'):
            dataset = f'synthetic/{task}'
        else:
            raise ValueError(f'task {task!r}: name its evaluation data with --dataset {task}=NAME')
        results.append(dict(Task=task_display_name(cfg.tasks[task]['type']), Dataset=dataset, Metrics=values))
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mtvision.checkpoint import load_training_state, load_weights

    from mtvision.models import build_model
    from mtvision.checkpoint import EMA_FILE, WEIGHTS_FILE, config_to_json, read_stored_config, \
        resolve_checkpoint, save_weights_file
    from mtvision.tasks import build_tasks
    from mtvision.zoo.metafile import _NAME, METAFILE_NAME

    if not _NAME.fullmatch(args.name):
        raise SystemExit(f'--name {args.name!r}: use letters, digits, "-" and "_" only (no ".")')
    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d')
    if len(date) != 8 or not date.isdigit():
        raise SystemExit(f'--date {date!r}: expected YYYYMMDD')
    datasets = {}
    for item in args.dataset:
        task, sep, dataset = item.partition('=')
        if not sep or not task or not dataset:
            raise SystemExit(f'--dataset {item!r}: expected TASK=NAME')
        datasets[task] = dataset
    collection = args.collection or (REGISTERED_COLLECTION if args.register else DEFAULT_COLLECTION)
    if args.register:
        if args.config:
            raise SystemExit('--config names a config of the repository\'s zoo; --register stores the run\'s own '
                             'config beside the user zoo\'s metafile instead')
        check_unclaimed(Path(args.register), args.name, collection)

    checkpoint = resolve_checkpoint(args.checkpoint)
    work_dir = checkpoint.parent
    cfg = read_stored_config(checkpoint)  # data, checked for building: a checkpoint may come from anyone
    ema_cfg = cfg.get('ema_cfg') or {}
    weights_file = checkpoint / (EMA_FILE if ema_cfg.get('evaluate') else WEIGHTS_FILE)
    with safe_open(weights_file, framework='pt') as f:
        header = dict(f.metadata() or {})
    weights = load_file(weights_file)
    model = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
    load_weights(model, weights)  # the published file must rebuild from its config, every key matching
    parameters = sum(p.numel() for p in model.parameters())

    config = None if args.register else args.config or _config_from_env(work_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {'format': 'mtvision', 'name': args.name}
    for key in ('backbone', 'step'):
        if key in header:
            metadata[key] = header[key]
    # hashed under a temporary name, then renamed to the name that carries the hash (mmpretrain's publish_model)
    tmp = out / f'.{args.name}.{os.getpid()}.tmp'
    try:
        save_weights_file(tmp, {key: tensor.contiguous() for key, tensor in weights.items()}, metadata)
        sort_header_metadata(tmp)
        sha256 = sha256_of(tmp)
        target = out / f'{args.name}_{date}-{sha256[:8]}.safetensors'
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if args.register and args.url_base is None:
        url = target.resolve().as_uri()
    else:
        url = (args.url_base or DEFAULT_URL_BASE).rstrip('/') + '/' + target.name
    if args.mirror:
        copy = Path(args.mirror) / urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip('/')
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, copy)

    step = int(header['step']) if 'step' in header else load_training_state(checkpoint).get('step')
    architecture = list(dict.fromkeys([cfg.model.backbone.type] + [cfg.tasks[task].head.type for task in cfg.tasks]))
    entry = {'Name': args.name, 'In Collection': collection,
             'Metadata': {'Training Data': _training_data(cfg, datasets), 'Parameters': parameters,
                          'Architecture': architecture, 'Iterations': step}}
    results = measured_results(work_dir / 'metrics.json', step, cfg, datasets)
    if results:
        entry['Results'] = results
    entry.update({'Weights': url, 'SHA256': sha256, 'Config': config or f'{target.stem}.json'})
    if args.register:
        register(Path(args.register), entry, config_to_json(cfg))
        print(f'registered {args.name} in {Path(args.register) / METAFILE_NAME}', file=sys.stderr)
    sys.stdout.write(yaml.safe_dump([entry], sort_keys=False, width=120))
    sys.stdout.flush()
    print(f'wrote {target}', file=sys.stderr)
    return dict(entry=entry, path=target)


def check_unclaimed(folder: Path, name: str, collection: str) -> None:
    """Before anything is written: the user zoo ``folder`` (created if needed) must hold a valid metafile or none,
    and ``name`` and ``collection`` must not be defined by the rest of the zoo (the repository's, the other
    ``MTVISION_ZOO`` folders), whose names a user zoo may not reuse."""
    from mtvision.zoo.metafile import METAFILE_NAME, load_metafile, load_zoo, user_zoo_dirs

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / METAFILE_NAME).is_file():
        load_metafile(folder / METAFILE_NAME, folder)  # a broken metafile is reported as it is, not rewritten
    zoo = load_zoo(user_zoos=[other for other in user_zoo_dirs() if other.resolve() != folder.resolve()])
    if name in zoo.models:
        raise SystemExit(f'--register {folder}: model {name!r} is already defined in {zoo.models[name].source}: '
                         f'choose another --name')
    if collection in zoo.collections:
        raise SystemExit(f'--register {folder}: collection {collection!r} is already defined in '
                         f'{zoo.collections[collection].source}: choose another --collection')


def register(folder: Path, entry: dict, config_text: str) -> None:
    """Add ``entry`` to the user zoo ``folder``: ``config_text`` as ``folder/<entry Config>`` and the entry in
    ``folder/metafile.yml``, in place of an entry of the same name (whose config file goes too, if this tool wrote
    it and no other entry names it).

    The metafile is written under a temporary name, read back as the zoo reads it, then renamed over the old one; on
    any error the old metafile is untouched and a config file written here is removed.
    """
    import yaml

    from mtvision.zoo.metafile import METAFILE_NAME, MetafileError, load_metafile

    metafile = folder / METAFILE_NAME
    data = (yaml.safe_load(metafile.read_text()) or {}) if metafile.is_file() else {}
    kept = [model for model in data.get('Models') or [] if model['Name'] != entry['Name']]
    replaced = [model for model in data.get('Models') or [] if model['Name'] == entry['Name']]
    collections = data.get('Collections') or []
    if entry['In Collection'] not in [collection['Name'] for collection in collections]:
        collections.append({'Name': entry['In Collection']})
    models = kept + [entry]

    config_file = folder / entry['Config']
    config_is_new = not config_file.exists()
    staged_config = folder / f'.{config_file.name}.{os.getpid()}.tmp'
    staged = folder / f'.{METAFILE_NAME}.{os.getpid()}.tmp'
    try:
        staged_config.write_text(config_text)
        os.replace(staged_config, config_file)
        staged.write_text(yaml.safe_dump({'Collections': collections, 'Models': models}, sort_keys=False, width=120))
        try:
            load_metafile(staged, folder)
        except MetafileError as error:
            raise SystemExit(f'--register {folder}: the new {metafile} would not load: {error}') from None
        os.replace(staged, metafile)
    except BaseException:
        if config_is_new:
            config_file.unlink(missing_ok=True)
        raise
    finally:
        staged_config.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    # the replaced entry's config goes if this tool wrote it (named after its weights file) and no entry names it
    still_named = {model['Config'] for model in models}
    for model in replaced:
        weights_name = urllib.parse.unquote(urllib.parse.urlsplit(model.get('Weights') or '').path).rpartition('/')[2]
        if model['Config'] not in still_named and model['Config'] == f'{Path(weights_name).stem}.json':
            (folder / model['Config']).unlink(missing_ok=True)


def _config_from_env(work_dir: Path) -> str:
    from mtvision.engine.logging import latest_run_dir

    env = (latest_run_dir(work_dir) or work_dir) / 'env.json'  # a work dir written before runs had folders: its own
    argv = json.loads(env.read_text()).get('argv', []) if env.is_file() else []
    configs = [arg for arg in argv[1:] if arg.endswith('.py') and arg.startswith('configs/')]
    if not configs:
        raise SystemExit(f'cannot tell the run\'s config from {env}: pass --config configs/<family>/<name>.py')
    return configs[0]


def _training_data(cfg, datasets: dict[str, str]) -> list[str] | str:
    if cfg.get('synthetic_data'):
        return 'synthetic'
    names = list(dict.fromkeys(datasets.get(task, task) for task in cfg.tasks))
    return names[0] if len(names) == 1 else names


if __name__ == '__main__':
    main()
