"""Export an mtvision backbone in timm's layout: a weights file that the timm model loads as it is.

    python tools/model_converters/mtvision_to_timm.py SRC OUT.safetensors

SRC is a checkpoint directory, work dir or weights file whose header names its backbone (training checkpoints,
published weights and ``timm_to_mtvision.py`` outputs do); a sharded checkpoint's shards are put together. OUT holds
the state dict of the timm model inside the backbone (``backbone.model.*``, renamed to timm's keys), so a
pre-trained backbone goes into any pipeline that builds timm models (timm itself, mmdet/mmseg's ``TIMMBackbone``,
detectron2 wrappers). The tool prints the ``timm.create_model`` arguments that build the architecture
(``num_classes=0``: the backbone holds no classifier) and, last, the SHA-256 of OUT.

MoE backbones have no timm counterpart and are refused. Backbone tensors outside the timm model (SimMIM's mask
token) are left out and listed. The header is read as data: only the registered backbone types are looked up, and
nothing in it is imported or run.
"""
import argparse
import hashlib
import inspect
import json
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export an mtvision backbone as a timm model's weights file")
    parser.add_argument('src', help='checkpoint directory, work dir or weights file with a backbone header')
    parser.add_argument('out', help='output .safetensors file (timm keys)')
    return parser.parse_args(argv)


def timm_export(src: str | Path) -> tuple[dict, dict, list[str]]:
    """``(timm state dict, timm.create_model arguments, backbone keys left out)`` of the backbone in ``src``."""
    from mtvision.checkpoint import read_metadata, read_weights
    from mtvision.registry import MODELS, check_stored

    metadata = read_metadata(src)
    if 'backbone' not in metadata:
        raise SystemExit(f'{src} names no backbone in its header (written by mtvision training, publish_model.py '
                         f'or timm_to_mtvision.py): nothing says which timm model it is')
    backbone = check_stored(MODELS, json.loads(metadata['backbone']), src)
    if backbone.get('moe'):
        raise SystemExit(f'{src} holds an MoE backbone ({backbone["moe"]}): timm has no model with task-routed '
                         f'experts; extract a task model first (tools/extract_task_model.py)')
    # the wrapper's own arguments (out_indices, pretrained...) are mtvision's; the rest go to timm.create_model
    wrapper = inspect.signature(MODELS.get(backbone['type'])).parameters
    own = {name for name, parameter in wrapper.items() if parameter.kind is not parameter.VAR_KEYWORD}
    create_args = {key: value for key, value in backbone.items() if key not in own and key != 'type'}
    create_args = dict(model_name=backbone.get('model_name', wrapper['model_name'].default), **create_args,
                       num_classes=0)
    prefix = 'backbone.model.'
    weights = read_weights(src)
    state = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
    if not state:
        raise SystemExit(f'{src} holds no backbone.model.* weights')
    left_out = sorted(key for key in weights if key.startswith('backbone.') and not key.startswith(prefix))
    return state, create_args, left_out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mtvision.checkpoint import save_weights_file

    state, create_args, left_out = timm_export(args.src)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights_file(out, {key: value.contiguous() for key, value in state.items()},
                      {'format': 'pt', 'timm_create_model': json.dumps(create_args, sort_keys=True)})
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f'wrote {out}: {len(state)} tensors in timm layout')
    if left_out:
        print(f'left out (not part of the timm model): {left_out}')
    print(f'build it with timm.create_model(**{json.dumps(create_args, sort_keys=True)})')
    print(f'sha256: {digest}')
    return dict(out=str(out), sha256=digest, create_args=create_args, left_out=left_out)


if __name__ == '__main__':
    main()
