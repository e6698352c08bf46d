"""Model-zoo metafiles: mmpretrain's ``metafile.yml`` schema, read and checked.

Every ``configs/<family>/metafile.yml`` under the zoo root holds ``Collections`` (groups of models trained the same
way) and ``Models``. The zoo root is the one that ships with mtvision (:func:`default_root`: the repository in a
checkout or an editable install, the package's copy of ``configs/`` in an installed wheel). Users' own zoos add to it:
every folder named by ``MTVISION_ZOO`` (``os.pathsep``-separated) holds ``metafile.yml`` files, in the folder itself
or one level down, whose ``Config`` paths are relative to that folder (``tools/publish_model.py --register DIR``
writes one). A model entry is::

    - Name: vit-tiny-p8_4task_600it_synthetic     # unique in the zoo; letters, digits, '-' and '_' only
      In Collection: Quick start                 # a collection of the same file
      Metadata:
        Training Data: synthetic                  # a name or a list of names
        Parameters: 2145678                       # every parameter of the built MultiTaskModel (heads included)
        FLOPs: 123456789                          # optional
        Architecture: [ViT, FCOS]
      Results:                                    # measured numbers only; one item per evaluated task
        - Task: Image Classification
          Dataset: synthetic/cls
          Metrics: {top1: 42.5, top5: 91.5}
      Weights: https://.../vit-tiny-p8_4task_600it_synthetic_20250101-0123abcd.safetensors
      SHA256: 0123abcd...                         # the full 64-digit SHA-256 of the weights file
      Config: configs/quickstart/vit-tiny-p8_4task_synthetic.py   # relative to the zoo root

An entry may instead point at public upstream weights of its backbone: ``Weights Format: timm`` (a timm-layout
state dict, converted into the backbone on load; the heads keep their initial weights), ``Converted From`` (mmpretrain's
key: ``Weights`` and ``Code`` URLs of the original release), and ``SHA256`` only where the upstream hash is known.
Such an entry has no ``Results``.

An entry without ``Weights`` is a *recipe*: a config one can train, listed in the zoo, which carries neither
``Results`` nor ``SHA256`` (there are no weights those numbers could belong to). A weights file name that carries a
hash (``<stem>-<hex>.<ext>``, mmpretrain's ``{name}_{date}-{sha256[:8]}.pth``) must agree with ``SHA256``.

Names follow mmpretrain's convention (``docs/en/advanced_guides/convention.md``): parts joined by ``_``, words
inside a part by ``-``; no ``.``, which ``torch.hub``'s hash pattern would misread in a file name.
"""
import math
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ['Collection', 'ENV_ZOO', 'METAFILE_NAME', 'WEIGHTS_FORMATS', 'MetafileError', 'ModelEntry', 'Zoo',
           'default_root', 'load_metafile', 'load_zoo', 'user_zoo_dirs']

METAFILE_NAME = 'metafile.yml'
ENV_ZOO = 'MTVISION_ZOO'
# where a built wheel carries configs/ inside the package (setup.py copies it there), mmpretrain's layout
PACKAGED_ZOO = Path(__file__).resolve().parents[1] / '.mim'

_TOP_KEYS = {'Collections', 'Models'}
_COLLECTION_KEYS = {'Name', 'Metadata', 'Paper', 'README', 'Code'}
_MODEL_KEYS = {'Name', 'In Collection', 'Metadata', 'Results', 'Weights', 'SHA256', 'Config', 'README',
               'Weights Format', 'Converted From'}
WEIGHTS_FORMATS = ('mtvision', 'timm')
_MODEL_REQUIRED = ('Name', 'In Collection', 'Metadata', 'Config')
_METADATA_KEYS = {'Training Data', 'Parameters', 'FLOPs', 'Architecture', 'Iterations', 'Epochs', 'Batch Size',
                  'Training Techniques', 'Training Resources'}
_METADATA_REQUIRED = ('Training Data', 'Parameters', 'Architecture')
_RESULT_KEYS = {'Task', 'Dataset', 'Metrics'}
_WEIGHT_SCHEMES = ('http', 'https', 'file', 'hf')
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]*')
_SHA256 = re.compile(r'[0-9a-f]{64}')
# torch.hub's check_hash convention: the hex digits after the last '-' of the file name's stem
_NAME_HASH = re.compile(r'-([0-9a-f]{8,64})$')


class MetafileError(ValueError):
    """A metafile that breaks the schema; the message names the file, the model (or collection) and the key."""


@dataclass(frozen=True)
class Collection:
    """A group of models trained the same way (mmpretrain's ``Collections`` item)."""
    name: str
    metadata: dict = field(default_factory=dict)
    paper: dict | None = None
    readme: str | None = None
    source: Path | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One ``Models`` item.

    ``config`` is as written (relative to the zoo root, or to the user zoo folder of its metafile); ``config_path``
    is resolved. ``weights`` and ``sha256`` are
    None for a recipe, whose ``results`` is empty. ``weights_format`` is ``'mtvision'`` (a whole model's weights, as
    published) or ``'timm'`` (an upstream backbone in timm's layout, converted into ``model.backbone`` on load;
    its ``sha256`` is None where the upstream hash is not known); ``converted_from`` names the original release.
    """
    name: str
    collection: str
    config: str
    config_path: Path
    metadata: dict
    results: list[dict] = field(default_factory=list)
    weights: str | None = None
    sha256: str | None = None
    readme: str | None = None
    source: Path | None = None
    weights_format: str = 'mtvision'
    converted_from: dict | None = None

    @property
    def is_recipe(self) -> bool:
        return self.weights is None

    @property
    def parameters(self) -> int:
        return self.metadata['Parameters']


@dataclass
class Zoo:
    """Every collection and model of a zoo, in file order (the root's metafiles sorted by path, then each user zoo's
    in turn)."""
    root: Path
    collections: dict[str, Collection]
    models: dict[str, ModelEntry]
    user_zoos: list[Path] = field(default_factory=list)

    def models_in(self, collection: str) -> list[ModelEntry]:
        return [entry for entry in self.models.values() if entry.collection == collection]


def default_root() -> Path:
    """The zoo that ships with mtvision: the package's copy of ``configs/`` in an installed wheel
    (``mtvision/.mim/configs``), else the repository holding the package (a checkout or an editable install)."""
    return PACKAGED_ZOO if (PACKAGED_ZOO / 'configs').is_dir() else PACKAGED_ZOO.parents[1]


def user_zoo_dirs() -> list[Path]:
    """The folders named by ``MTVISION_ZOO`` (``os.pathsep``-separated; empty parts ignored).

    Raises:
        MetafileError: a name that is not a folder (a typo would otherwise hide the models silently).
    """
    value = os.environ.get(ENV_ZOO, '')
    folders = [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise MetafileError(f'{ENV_ZOO}={value!r}: not a folder: {missing}')
    return folders


def load_zoo(root: str | os.PathLike | None = None,
             user_zoos: Sequence[str | os.PathLike] | None = None) -> Zoo:
    """Read and check every ``<root>/configs/*/metafile.yml``, then the metafiles of each user zoo.

    Args:
        root: the zoo root; default: :func:`default_root`, the zoo that ships with mtvision.
        user_zoos: folders holding users' ``metafile.yml`` files (in the folder or one level down; ``Config``
            relative to the folder). Default: the ``MTVISION_ZOO`` folders when ``root`` is None, none when a root
            is given (an explicit root is that zoo alone).

    Raises:
        MetafileError: a schema violation (naming the file, model and key), or a model or collection name used
            twice (naming both files), in the root or a user zoo.
    """
    if user_zoos is None:
        user_zoos = user_zoo_dirs() if root is None else []
    root = Path(root) if root is not None else default_root()
    user_zoos = [Path(folder) for folder in user_zoos]
    sources = [(path, root) for path in sorted((root / 'configs').glob(f'*/{METAFILE_NAME}'))]
    for folder in user_zoos:
        paths = sorted(folder.glob(METAFILE_NAME)) + sorted(folder.glob(f'*/{METAFILE_NAME}'))
        sources += [(path, folder) for path in paths]
    collections: dict[str, Collection] = {}
    models: dict[str, ModelEntry] = {}
    for path, config_root in sources:
        file_collections, file_models = load_metafile(path, config_root)
        for collection in file_collections:
            if collection.name in collections:
                raise MetafileError(f'{path}: collection {collection.name!r} is already defined in '
                                    f'{collections[collection.name].source}')
            collections[collection.name] = collection
        for entry in file_models:
            if entry.name in models:
                raise MetafileError(f'{path}: model {entry.name!r} is already defined in {models[entry.name].source}')
            models[entry.name] = entry
    return Zoo(root, collections, models, user_zoos)


def load_metafile(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[list[Collection],
                                                                                          list[ModelEntry]]:
    """The checked collections and models of one metafile; ``Config`` paths resolve against ``root``."""
    path = Path(path)
    root = Path(root) if root is not None else default_root()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MetafileError(f'{path}: not valid YAML: {error}') from error
    if not isinstance(data, Mapping):
        raise MetafileError(f'{path}: expected a mapping with {sorted(_TOP_KEYS)}, got {type(data).__name__}')
    _check_keys(data, _TOP_KEYS, (), f'{path}')
    collections = [_collection(item, path, i) for i, item in enumerate(_list(data, 'Collections', f'{path}'))]
    names = {collection.name for collection in collections}
    if len(names) != len(collections):
        raise MetafileError(f'{path}: a collection name is used twice: {[c.name for c in collections]}')
    models = [_model(item, path, i, root, names) for i, item in enumerate(_list(data, 'Models', f'{path}'))]
    seen: set[str] = set()
    for entry in models:
        if entry.name in seen:
            raise MetafileError(f'{path}: model {entry.name!r} is defined twice')
        seen.add(entry.name)
    return collections, models


def _list(data: Mapping, key: str, where: str) -> list:
    value = data.get(key) or []
    if not isinstance(value, list):
        raise MetafileError(f'{where}: {key!r} must be a list, got {type(value).__name__}')
    return value


def _check_keys(item: Mapping, allowed: set[str], required: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(map(str, item)) - allowed)
    if unknown:
        raise MetafileError(f'{where}: unknown key(s) {unknown}; known keys: {sorted(allowed)}')
    missing = [key for key in required if key not in item]
    if missing:
        raise MetafileError(f'{where}: missing required key(s) {missing}')


def _string(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MetafileError(f'{where} must be a non-empty string, got {value!r}')
    return value


def _collection(item, path: Path, index: int) -> Collection:
    where = f'{path}: Collections[{index}]'
    if not isinstance(item, Mapping):
        raise MetafileError(f'{where} must be a mapping, got {type(item).__name__}')
    if 'Name' in item:
        where = f'{path}: collection {item["Name"]!r}'
    _check_keys(item, _COLLECTION_KEYS, ('Name',), where)
    name = _string(item['Name'], f'{where}: Name')
    metadata = item.get('Metadata') or {}
    if not isinstance(metadata, Mapping):
        raise MetafileError(f'{where}: Metadata must be a mapping, got {type(metadata).__name__}')
    paper = item.get('Paper')
    if paper is not None and not (isinstance(paper, Mapping) and set(paper) <= {'Title', 'URL'}):
        raise MetafileError(f'{where}: Paper must be a mapping with Title and URL, got {paper!r}')
    return Collection(name, dict(metadata), dict(paper) if paper else None, item.get('README'), path)


def _model(item, path: Path, index: int, root: Path, collections: set[str]) -> ModelEntry:
    if not isinstance(item, Mapping):
        raise MetafileError(f'{path}: Models[{index}] must be a mapping, got {type(item).__name__}')
    where = f'{path}: model {item["Name"]!r}' if 'Name' in item else f'{path}: Models[{index}]'
    _check_keys(item, _MODEL_KEYS, _MODEL_REQUIRED, where)
    name = _string(item['Name'], f'{where}: Name')
    if not _NAME.fullmatch(name):
        raise MetafileError(f'{where}: Name may hold only letters, digits, "-" and "_" (parts joined by "_", '
                            f'words by "-")')
    collection = _string(item['In Collection'], f'{where}: In Collection')
    if collection not in collections:
        raise MetafileError(f'{where}: In Collection {collection!r} is not a collection of this file '
                            f'({sorted(collections)})')
    metadata = _metadata(item['Metadata'], where)
    config = _string(item['Config'], f'{where}: Config')
    config_path = root / config
    if Path(config).is_absolute() or not config_path.is_file():
        raise MetafileError(f'{where}: Config {config!r} is not a config file relative to the zoo root {root}')
    results = [_result(result, f'{where}: Results[{i}]') for i, result in enumerate(_list(item, 'Results', where))]
    weights, sha256 = item.get('Weights'), item.get('SHA256')
    weights_format = item.get('Weights Format', 'mtvision')
    if weights_format not in WEIGHTS_FORMATS:
        raise MetafileError(f'{where}: Weights Format must be one of {WEIGHTS_FORMATS}, got {weights_format!r}')
    converted_from = item.get('Converted From')
    if converted_from is not None:
        if not isinstance(converted_from, Mapping) or not set(converted_from) <= {'Weights', 'Code'} or not all(
                isinstance(value, str) and urllib.parse.urlsplit(value).scheme for value in converted_from.values()):
            raise MetafileError(f'{where}: Converted From must be a mapping of Weights and/or Code to URLs, got '
                                f'{converted_from!r}')
    if weights is None:
        extra = [key for key in ('Results', 'SHA256', 'Weights Format', 'Converted From') if item.get(key)]
        if extra:
            raise MetafileError(f'{where}: a recipe (no Weights) cannot have {extra}: numbers, hashes and sources '
                                f'belong to weights')
    else:
        # upstream weights carry their hash where it is known; weights this project publishes always do
        _check_weights(_string(weights, f'{where}: Weights'), sha256, where,
                       optional_hash=weights_format == 'timm')
    if weights_format == 'timm' and results:
        raise MetafileError(f'{where}: upstream backbone weights (Weights Format: timm) have no Results here: the '
                            f'zoo lists numbers measured on the model it builds')
    return ModelEntry(name, collection, config, config_path, metadata, results, weights, sha256,
                      item.get('README'), path, weights_format, dict(converted_from) if converted_from else None)


def _metadata(metadata, where: str) -> dict:
    if not isinstance(metadata, Mapping):
        raise MetafileError(f'{where}: Metadata must be a mapping, got {type(metadata).__name__}')
    _check_keys(metadata, _METADATA_KEYS, _METADATA_REQUIRED, f'{where}: Metadata')
    for key in ('Parameters', 'FLOPs', 'Iterations', 'Epochs', 'Batch Size'):
        value = metadata.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise MetafileError(f'{where}: Metadata.{key} must be a positive integer, got {value!r}')
    for key in ('Training Data', 'Architecture'):
        value = metadata[key]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise MetafileError(f'{where}: Metadata.{key} must be a name or a list of names, got {value!r}')
    return dict(metadata)


def _result(result, where: str) -> dict:
    if not isinstance(result, Mapping):
        raise MetafileError(f'{where} must be a mapping, got {type(result).__name__}')
    _check_keys(result, _RESULT_KEYS, ('Task', 'Dataset', 'Metrics'), where)
    _string(result['Task'], f'{where}: Task')
    _string(result['Dataset'], f'{where}: Dataset')
    metrics = result['Metrics']
    if not isinstance(metrics, Mapping) or not metrics:
        raise MetafileError(f'{where}: Metrics must be a non-empty mapping of metric name to number, got {metrics!r}')
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MetafileError(f'{where}: Metrics.{key} must be a finite number, got {value!r}')
    return dict(result, Metrics=dict(metrics))


def _check_weights(weights: str, sha256, where: str, optional_hash: bool = False) -> None:
    scheme = urllib.parse.urlsplit(weights).scheme.lower()
    if scheme not in _WEIGHT_SCHEMES:
        raise MetafileError(f'{where}: Weights {weights!r} must be a URL with scheme {_WEIGHT_SCHEMES}')
    if sha256 is None and optional_hash:
        return
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise MetafileError(f'{where}: SHA256 must be the 64-digit lower-case hex SHA-256 of the weights file, '
                            f'got {sha256!r}')
    stem = urllib.parse.unquote(urllib.parse.urlsplit(weights).path).rpartition('/')[2].partition('.')[0]
    match = _NAME_HASH.search(stem)
    if match and not sha256.startswith(match.group(1)):
        raise MetafileError(f'{where}: the Weights file name carries hash {match.group(1)!r}, but SHA256 is '
                            f'{sha256!r}')
