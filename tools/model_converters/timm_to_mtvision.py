"""Convert timm weights into an mtvision backbone weights file.

    python tools/model_converters/timm_to_mtvision.py SRC OUT.safetensors --config CONFIG [--cfg-options k=v ...]
    python tools/model_converters/timm_to_mtvision.py SRC OUT.safetensors --backbone-json '{"type": "ViT", ...}'

SRC is a weights file (``.safetensors``, or a ``.pth`` / ``.pt`` / ``.bin`` state dict, read without running its
pickle) as timm saves it or as timm loads released checkpoints (MAE, DINOv2, Microsoft's Swin), or
``timm:<name>[@<weights file>]``: the timm model ``<name>`` with timm's pretrained weights (from its cache, or
downloaded) or with a local file that timm loads itself; ``--src-kwargs`` passes its architecture arguments
(``img_size``, ``depth``...) when they differ from ``<name>``'s.

The backbone of CONFIG (``model.backbone``) or the JSON config is built, the weights are converted onto it
(:func:`mtvision.zoo.convert.convert_timm_state_dict`: position and patch embeddings resampled, classifiers and MAE
decoders dropped, anything else unmatched is an error), and OUT is written as training checkpoints are: keys
``backbone.<name>`` and the backbone config in the ``backbone`` header entry, so ``tools/knn.py OUT.safetensors``
and the other probes read it as they read a trained model's weights. The backbone config is written without
the arguments that load weights (``pretrained``, ``pretrained_file``...: ``mtvision.registry.WEIGHTS_ARGS``): the
weights are in OUT. A ``--backbone-json`` is data, so only mtvision's registered names and timm model names in it are
built (``mtvision.registry.check_stored``). The SHA-256 of OUT is printed last.
"""
import argparse
import json

from mmengine.config import DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Convert timm weights into an mtvision backbone weights file')
    parser.add_argument('src', help='timm weights file, or timm:<name>[@<weights file>]')
    parser.add_argument('out', help='output .safetensors file')
    arch = parser.add_mutually_exclusive_group(required=True)
    arch.add_argument('--config', help='training config whose model.backbone receives the weights')
    arch.add_argument('--backbone-json', help='backbone config as JSON text, or a .json file holding it')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys, e.g. model.backbone.img_size=384 (with --config)')
    parser.add_argument('--src-kwargs', default='{}',
                        help='JSON of timm.create_model arguments for a timm:<name> SRC, e.g. \'{"img_size": 518}\'')
    return parser.parse_args(argv)


def backbone_config_from(args: argparse.Namespace) -> dict:
    """The backbone config named by ``--config`` (with ``--cfg-options``) or ``--backbone-json``."""
    from pathlib import Path

    from mtvision.config import load_config
    from mtvision.models import backbone_config
    from mtvision.registry import MODELS, WEIGHTS_ARGS, check_stored

    if args.config is not None:
        cfg = backbone_config(load_config(args.config, args.cfg_options))
    else:
        if args.cfg_options:
            raise SystemExit('--cfg-options applies to --config only; edit the --backbone-json instead')
        text, source = args.backbone_json, '--backbone-json'
        if text.endswith('.json') and Path(text).is_file():
            text, source = Path(text).read_text(), text
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f'--backbone-json is not valid JSON ({error}): {args.backbone_json!r}') from None
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise SystemExit(f'the backbone config must be a dict with a registered type, got {cfg!r}')
    if args.config is None:  # JSON is data (perhaps a file from elsewhere), unlike a config file: checked names only
        cfg = check_stored(MODELS, cfg, source)
    return {key: value for key, value in cfg.items() if key not in WEIGHTS_ARGS}


def read_source(src: str, src_kwargs: dict) -> dict:
    """The state dict SRC names (see the module docstring)."""
    from pathlib import Path

    from mtvision.zoo import load_weights_file

    if not src.startswith('timm:'):
        if src_kwargs:
            raise SystemExit('--src-kwargs applies to a timm:<name> SRC only')
        return load_weights_file(src)
    import timm

    name, _, weights_file = src[len('timm:'):].partition('@')
    if weights_file and not Path(weights_file).is_file():
        raise SystemExit(f'SRC {src!r}: no weights file {weights_file!r}')
    if not timm.is_model(name):
        raise SystemExit(f'SRC {src!r}: {name!r} is not a timm model name')
    kwargs = dict(src_kwargs, pretrained=True, num_classes=0)  # no classifier: a backbone has none
    if weights_file:
        kwargs['pretrained_cfg_overlay'] = dict(file=weights_file)
    return timm.create_model(name, **kwargs).state_dict()


def main(argv=None) -> dict:
    args = parse_args(argv)
    import hashlib
    import os
    from pathlib import Path

    from mtvision.checkpoint import save_weights_file
    from mtvision.engine.logging import setup_logging, to_json
    from mtvision.registry import MODELS
    from mtvision.zoo.convert import convert_timm_state_dict

    setup_logging()
    out = Path(args.out)
    if out.suffix != '.safetensors':
        raise SystemExit(f'OUT must be a .safetensors file, got {args.out!r}')
    try:
        src_kwargs = json.loads(args.src_kwargs)
    except json.JSONDecodeError as error:
        raise SystemExit(f'--src-kwargs is not valid JSON ({error}): {args.src_kwargs!r}') from None
    if not isinstance(src_kwargs, dict):
        raise SystemExit(f'--src-kwargs must be a JSON object, got {args.src_kwargs!r}')
    backbone_cfg = backbone_config_from(args)
    backbone = MODELS.build(dict(backbone_cfg))
    try:
        state = convert_timm_state_dict(read_source(args.src, src_kwargs), backbone)
    except ValueError as error:
        raise SystemExit(f'cannot convert {args.src}: {error}') from None
    backbone.load_state_dict(state)  # strict: what the file holds is exactly what this backbone loads

    weights, storages = {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        weights[f'backbone.{name}'] = tensor
    header = {'format': 'mtvision', 'backbone': to_json(backbone_cfg), 'converted_from': args.src}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
    try:
        save_weights_file(tmp, weights, header)
        os.replace(tmp, out)  # readers never see a partial file
    finally:
        tmp.unlink(missing_ok=True)
    digest = hashlib.sha256()
    with open(out, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    params = sum(tensor.numel() for tensor in weights.values())
    print(f'wrote {out}: {len(weights)} tensors, {params / 1e6:.2f} M values, backbone {backbone_cfg["type"]}')
    print(f'sha256: {digest.hexdigest()}')
    return dict(out=str(out), sha256=digest.hexdigest(), backbone=backbone_cfg, num_tensors=len(weights))


if __name__ == '__main__':
    main()
