"""Weights saved by timm (or released in a layout timm loads) mapped onto an mtvision backbone.

mtvision's backbones hold their timm model as ``self.model``, so a wrapper's state-dict keys are ``model.<timm key>``
plus the wrapper's own parameters (Swin's SimMIM ``mask_token``). The conversion reuses the ``checkpoint_filter_fn``
of the timm module that defines the backbone's model, the same function timm runs when it loads pretrained weights:

- ViT (``timm.models.vision_transformer``): the absolute position embedding is resampled to the backbone's patch grid
  (bicubic, prefix tokens kept as they are), the patch embedding to its patch size (``resample_patch_embed``, the
  pseudo-inverse resize of FlexiViT, Beyer et al. 2023); DINOv2's released checkpoints (recognised by their
  ``mask_token``) lose the mask token, and with registers their ``register_tokens`` become ``reg_token`` and the
  class token's position embedding is folded into ``cls_token`` (timm builds those models with ``no_embed_class``);
  DINOv2's layer-scale ``ls1.gamma`` / ``ls2.gamma`` keys are already timm's, DeiT III's ``gamma_1`` / ``gamma_2``
  are renamed to them.
- Swin v1 / v2: relative position bias tables are resized to the backbone's window (``resize_rel_pos_bias_table``),
  index and mask buffers are dropped, and the original Microsoft layout (downsampling at the end of a stage) is
  renamed to timm's.

On top of timm's filter:

- classifier weights (``head.*``, ``head_dist.*``, ``pre_logits.*``) and MAE's pre-training-only modules (the whole
  decoder ``decoder_*`` and the ``mask_token``, He et al. 2022) are dropped: a backbone holds neither;
- MAE's fine-tuned checkpoints (global average pooling) hold the encoder's last LayerNorm as ``fc_norm`` (applied to
  the pooled token) and no ``norm``; a backbone that normalises every token (timm's ``norm``, no ``fc_norm``) gets
  those parameters as its ``norm``;
- a backbone with mixture-of-experts layers gets every expert as a copy of the dense MLP (sparse upcycling, see
  :func:`mtvision.models.moe.upcycle_state_dict`);
- values are cast to the backbone's dtypes.

Anything else that does not match (a key the backbone lacks, a backbone key the weights lack, a shape) is an error
that names every offending key.
"""
import inspect
import logging
import re
import sys
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from mtvision.checkpoint import load_weights
from mtvision.models.moe import upcycle_state_dict

__all__ = ['DROPPED_KEYS', 'convert_timm_state_dict', 'is_timm_layout', 'load_backbone_state', 'load_state',
           'resample_geometry', 'shorten_keys', 'timm_filter_fn']

logger = logging.getLogger(__name__)

# timm keys (after timm's own filter) that no backbone holds: classifiers, and MAE's decoder and mask token
DROPPED_KEYS = re.compile(r'(head|head_dist|pre_logits)\..+|decoder_.+|mask_token')

FilterFn = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]


def timm_filter_fn(model: nn.Module) -> FilterFn:
    """The ``checkpoint_filter_fn`` of the timm module defining ``type(model)``; identity when it has none."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is None:
        logger.info('%s defines no checkpoint_filter_fn: keys are used as they are', type(model).__module__)
        return lambda state, model: dict(state)
    return filter_fn


def convert_timm_state_dict(state: Mapping[str, Tensor], backbone: nn.Module, prefix: str = 'model.') -> dict:
    """``backbone``'s state dict from ``state``, a state dict of the timm model ``backbone`` wraps at ``prefix``.

    Args:
        state: weights as timm saves them or as timm loads released checkpoints (MAE, DINOv2, Microsoft's Swin),
            optionally wrapped in ``{'model': ...}`` / ``{'state_dict': ...}``. It is not modified.
        backbone: the mtvision backbone (e.g. :class:`~mtvision.models.backbones.ViT`) to convert for; its geometry
            (image size, patch size, window size) is the target of the resampling.
        prefix: where the timm model sits in ``backbone`` (``'model.'`` for mtvision's wrappers; ``''`` for a bare
            timm model).

    Returns:
        A complete state dict for ``backbone.load_state_dict(..., strict=True)``. Keys outside ``prefix`` (the
        wrapper's own, e.g. Swin's SimMIM ``mask_token``) keep ``backbone``'s current values.

    Raises:
        ValueError: the weights and the backbone do not match: keys the backbone does not have (other than those
            matched by :data:`DROPPED_KEYS`), backbone keys the weights lack, or shapes that differ after the
            resampling, each listed by name.
    """
    if prefix and not prefix.endswith('.'):
        raise ValueError(f"prefix must be '' or end with '.', got {prefix!r}")
    try:
        model = backbone.get_submodule(prefix[:-1]) if prefix else backbone
    except AttributeError:
        raise ValueError(f'{type(backbone).__name__} has no submodule at prefix {prefix!r}') from None
    target = backbone.state_dict()
    for wrapper in ('model', 'state_dict'):  # training scripts' wrappers, as timm's filters unwrap them
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    filter_fn = timm_filter_fn(model)
    options = {}
    if any(re.search(r'(^|\.)gamma_[12]$', key) for key in state) and \
            'adapt_layer_scale' in inspect.signature(filter_fn).parameters:
        options['adapt_layer_scale'] = True  # DeiT III's released layer scales: gamma_1 -> ls1.gamma
    # a shallow copy: timm's DINOv2 conversion pops keys from the dict it is given
    filtered = filter_fn(dict(state), model, **options)
    not_tensors = sorted(key for key, value in filtered.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise ValueError(f'not a state dict of tensors: values of {not_tensors[:10]} are not tensors')
    own = {key[len(prefix):] for key in target if key.startswith(prefix)}
    filtered = _fc_norm_as_norm(filtered, own)

    converted, dropped = {}, []
    for key, value in filtered.items():
        if key not in own and DROPPED_KEYS.fullmatch(key):
            dropped.append(key)
        else:
            converted[prefix + key] = value
    if dropped:
        logger.info('dropped %d keys no backbone holds: %s', len(dropped), shorten_keys(dropped))
    converted, upcycled = upcycle_state_dict(converted, backbone)
    if upcycled:
        logger.info('upcycled the dense MLPs of %d blocks into their MoE layers: %s', len(upcycled), upcycled)

    unexpected = sorted(key[len(prefix):] for key in converted if key not in target)
    missing = sorted(key[len(prefix):] for key in target if key.startswith(prefix) and key not in converted)
    wrong_shape = [f'{key[len(prefix):]}: weights {tuple(value.shape)} vs backbone {tuple(target[key].shape)}'
                   for key, value in converted.items() if key in target and value.shape != target[key].shape]
    problems = ([f'not in the backbone: {shorten_keys(unexpected)}'] if unexpected else []) + (
        [f'missing from the weights: {shorten_keys(missing)}'] if missing else []) + wrong_shape
    if problems:
        raise ValueError(f'the timm weights do not match the {type(model).__name__} in {type(backbone).__name__} '
                         f'(timm keys, without {prefix!r}):\n  ' + '\n  '.join(problems))
    return {key: converted[key].to(own_value.dtype) if key in converted else own_value
            for key, own_value in target.items()}


def _fc_norm_as_norm(state: dict[str, Tensor], own: set[str]) -> dict[str, Tensor]:
    # MAE's models_vit.py replaces `norm` by `fc_norm` when fine-tuning with global pooling: the same LayerNorm,
    # applied after pooling rather than to every token
    if 'fc_norm.weight' not in state or 'norm.weight' in state or 'fc_norm.weight' in own or 'norm.weight' not in own:
        return state
    logger.warning('the weights hold fc_norm (a LayerNorm after global pooling, as MAE fine-tuning saves it) and no '
                   'norm: loaded as the norm of every token')
    return {re.sub(r'^fc_norm\.', 'norm.', key): value for key, value in state.items()}


def shorten_keys(keys: list[str], limit: int = 20) -> str:
    """The first ``limit`` keys, comma-separated, and how many more: a key list fit for an error message."""
    return ', '.join(keys[:limit]) + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


MODEL_PREFIXES = ('backbone.', 'heads.', 'momentum_backbones.')


def is_timm_layout(weights: Mapping[str, Tensor]) -> bool:
    """Weights without mtvision's ``backbone.`` / ``heads.`` names: a timm model's or an upstream release's."""
    return bool(weights) and not any(key.startswith(MODEL_PREFIXES) for key in weights)


def load_backbone_state(backbone: nn.Module, weights: Mapping[str, Tensor]) -> str:
    """Load a backbone from a whole model's weights (its ``backbone.*`` part) or from weights in timm's layout
    (converted); returns what was loaded, for the log."""
    if is_timm_layout(weights):
        backbone.load_state_dict(convert_timm_state_dict(weights, backbone))
        return "timm's layout, converted into the backbone"
    load_weights(backbone, _part(weights, 'backbone.'))
    return 'the backbone'


# position tables and patch embeddings, which timm resamples to a model of another image, patch or window size
GEOMETRY_KEYS = re.compile(r'(^|\.)(pos_embed|patch_embed\.proj\.weight|relative_position_bias_table)$')


def resample_geometry(weights: Mapping[str, Tensor], backbone: nn.Module, prefix: str = 'backbone.') -> dict:
    """mtvision weights of a backbone trained at another geometry (image size, patch size, Swin window: fine-tuning
    at 512 px from 224 px pre-training), resampled as timm resamples released weights: when a position table or
    the patch embedding of the wrapped timm model (``<prefix>model.*``) differs in shape from ``backbone``'s, that
    part goes through :func:`convert_timm_state_dict`; everything else is returned as it is."""
    target = backbone.state_dict()
    inner = f'{prefix}model.'
    shapes_differ = {key for key, value in weights.items() if key.startswith(inner) and key[len(prefix):] in target
                     and value.shape != target[key[len(prefix):]].shape}
    differs = sorted(key for key in shapes_differ if GEOMETRY_KEYS.search(key))
    if not differs or len(differs) < len(shapes_differ):  # another width or depth: not a geometry to resample
        return dict(weights)
    converted = convert_timm_state_dict({key[len(inner):]: value for key, value in weights.items()
                                         if key.startswith(inner)}, backbone)
    logger.info("resampled to the backbone's geometry: %s", shorten_keys(differs))
    return {**weights, **{prefix + key: value for key, value in converted.items() if key.startswith('model.')}}


def load_state(model: nn.Module, weights: Mapping[str, Tensor]) -> str:
    """Load ``weights`` into a ``MultiTaskModel`` the one way every entry point does (through
    :func:`mtvision.zoo.resolve.load_pretrained`); returns what was loaded, for the log.

    Weights in timm's layout (no ``backbone.`` / ``heads.`` names: a timm or upstream release) are converted into
    the backbone (:func:`convert_timm_state_dict`); ``backbone.*`` weights initialise the backbone; a whole model's
    weights load into the whole model, or, when it was trained on other tasks (fine-tuning), into the backbone and
    the heads of the tasks both have, the other heads newly initialised. Position tables and patch embeddings of
    another geometry are resampled (:func:`resample_geometry`); dense MLP weights into MoE layers are upcycled.
    Heads not in the weights keep their initial weights, and momentum encoders not in them start as copies of the
    loaded backbone.
    """
    weights = dict(weights)
    if is_timm_layout(weights):
        loaded = load_backbone_state(model.backbone, weights) + '; the heads are newly initialised'
    else:
        weights, upcycled = upcycle_state_dict(resample_geometry(weights, model.backbone), model)
        loaded = f'dense MLPs upcycled into the MoE layers of blocks {upcycled}; ' if upcycled else ''
        stored_tasks = {key.split('.')[1] for key in weights if key.startswith(('heads.', 'momentum_backbones.'))}
        if weights and all(key.startswith('backbone.') for key in weights):
            load_weights(model.backbone, _part(weights, 'backbone.'))
            loaded += 'a backbone; the heads are newly initialised'
        elif stored_tasks != set(model.heads):  # fine-tuning on other tasks: the backbone and the heads in common
            load_weights(model.backbone, _part(weights, 'backbone.'))
            common = sorted(stored_tasks & set(model.heads))
            for task in common:  # a head of the same name must fit: an error lists the keys that do not
                load_weights(model.heads[task], _part(weights, f'heads.{task}.'))
            weights = {key: value for key, value in weights.items() if not key.startswith('momentum_backbones.')}
            loaded += (f'the backbone and the heads of {common}; newly initialised: '
                       f'{sorted(set(model.heads) - stored_tasks)}')
        else:
            load_weights(model, weights)
            loaded += 'the whole model'
    if not any(key.startswith('momentum_backbones.') for key in weights):
        model.reset_momentum()  # momentum encoders the weights do not hold start as copies of the loaded backbone
    return loaded


def _part(weights: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
