"""Joint transforms: torchvision.transforms.v2 on tv_tensors, built from config dicts.

Datasets wrap their labels as tv_tensors (``BoundingBoxes``, ``Mask``), so every geometric transform moves image,
boxes, instance masks, label maps and depth maps together. Masks keep their dtype (uint8 instance masks, int64
label maps, float32 depth) and are resampled with nearest interpolation; the resizing transforms registered here
(``Resize``, ``RandomResizedCrop``, ``RandomResize``, ``RandomShortestSize``, ``ScaleJitter``) are v2's with
masks resized pixel-centred (``nearest-exact``), so labels stay aligned with the bilinear-resized image. Crops
clip boxes to the new canvas, and ``SanitizeBoundingBoxes`` then drops the boxes that became degenerate together
with their labels and instance masks. Photometric transforms, :class:`ToFloat` and ``Normalize`` touch the image
only; :class:`GaussianBlur` is v2's computed by OpenCV, and :class:`RandomApply` takes its transforms as config dicts.
The loaders run a pipeline up to its final ``ToFloat`` + ``Normalize`` and do those two on the device
(:mod:`mtvision.data.prefetch`); a dataset read directly gives the whole pipeline's output.

Fine-tuning recipes (DeiT, DeiT III, MAE's fine-tuning) add :class:`RandAugment` or :class:`TrivialAugmentWide`
(uint8 images; classification only, since their shears, translations and rotations move the image alone) or
:class:`ThreeAugment`. What these recipes run on normalised batches (random erasing, MixUp, CutMix) is not a
pipeline step: it is a task's ``batch_augments`` (:mod:`mtvision.data.batch_augments`), applied on the device.

Typical pipelines at 64 px (``norm = dict(type='Normalize', mean=IMAGENET_MEAN, std=IMAGENET_STD)``)::

    # classification and segmentation
    train = [dict(type='RandomResizedCrop', size=64, scale=(0.5, 1.0)), dict(type='RandomHorizontalFlip'),
             dict(type='ColorJitter', brightness=0.3, contrast=0.3, saturation=0.3), dict(type='ToFloat'), norm]
    val = [dict(type='Resize', size=(64, 64)), dict(type='ToFloat'), norm]
    # classification evaluated as timm does (short side to floor(64 / 0.875) = 73, bicubic, centre crop 64)
    val = [dict(type='ResizeCenterCrop', size=64, crop_pct=0.875), dict(type='ToFloat'), norm]
    # detection: as above, with dict(type='SanitizeBoundingBoxes') right after the geometric transforms
    # depth: scaling the image would change apparent sizes but not depths, so crop and flip without rescaling;
    # padding fills 0, which reads as invalid depth
    train = [dict(type='RandomCrop', size=64, padding=4), dict(type='RandomHorizontalFlip'),
             dict(type='ColorJitter', brightness=0.3, contrast=0.3, saturation=0.3), dict(type='ToFloat'), norm]
    val = [dict(type='ToFloat'), norm]

Padding label maps must fill the ignore index: ``fill`` may be a dict keyed by tv_tensor class name, e.g.
``dict(type='RandomCrop', size=64, pad_if_needed=True, fill=dict(Image=0, Mask=255))``; it is turned into the
class-keyed dict that v2 expects, so that it can be written in a config file.
"""
import math
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mtvision.registry import TRANSFORMS

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'GaussianBlur', 'MultiCrop', 'MultiView', 'RandAugment', 'RandomApply',
           'RandomResize', 'RandomResizedCrop', 'RandomShortestSize', 'Resize', 'ResizeCenterCrop', 'ScaleJitter',
           'ThreeAugment', 'ToFloat', 'TrivialAugmentWide', 'build_pipeline']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_V2_TRANSFORMS = (
    # geometric (the resizing ones are defined below)
    v2.RandomCrop, v2.CenterCrop, v2.Pad, v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomAffine,
    v2.RandomRotation, v2.RandomZoomOut, v2.RandomIoUCrop,
    # photometric (image only)
    v2.ColorJitter, v2.RandomPhotometricDistort, v2.RandomGrayscale, v2.RandomAutocontrast, v2.RandomEqualize,
    v2.RandomSolarize,
    # boxes
    v2.ClampBoundingBoxes, v2.SanitizeBoundingBoxes,
    # float image
    v2.Normalize,
)
for _transform in _V2_TRANSFORMS:
    TRANSFORMS.register_module(module=_transform)


class _CentredMaskResize:
    """Resize masks with ``nearest-exact``, which samples at pixel centres like the image's bilinear resize.

    torchvision resizes masks with torch's legacy ``nearest``, which samples source pixel ``floor(i * scale)``
    instead of the centre's ``floor((i + 0.5) * scale)``: when shrinking, the label map lands up to one source
    pixel up-left of the image.
    """

    def _call_kernel(self, functional, inpt, *args, **kwargs):
        if isinstance(inpt, tv_tensors.Mask):
            if functional is F.resized_crop:  # its mask kernel ignores `interpolation`: crop, then resize
                cropped = F.crop(inpt, kwargs['top'], kwargs['left'], kwargs['height'], kwargs['width'])
                return F.resize(cropped, kwargs['size'], interpolation=v2.InterpolationMode.NEAREST_EXACT)
            if functional is F.resize:
                kwargs['interpolation'] = v2.InterpolationMode.NEAREST_EXACT
        return super()._call_kernel(functional, inpt, *args, **kwargs)


@TRANSFORMS.register_module()
class Resize(_CentredMaskResize, v2.Resize):
    """:class:`torchvision.transforms.v2.Resize` with pixel-centred mask resizing."""


@TRANSFORMS.register_module()
class RandomResizedCrop(_CentredMaskResize, v2.RandomResizedCrop):
    """:class:`torchvision.transforms.v2.RandomResizedCrop` with pixel-centred mask resizing."""


@TRANSFORMS.register_module()
class RandomResize(_CentredMaskResize, v2.RandomResize):
    """:class:`torchvision.transforms.v2.RandomResize` with pixel-centred mask resizing."""


@TRANSFORMS.register_module()
class RandomShortestSize(_CentredMaskResize, v2.RandomShortestSize):
    """:class:`torchvision.transforms.v2.RandomShortestSize` with pixel-centred mask resizing."""


@TRANSFORMS.register_module()
class ScaleJitter(_CentredMaskResize, v2.ScaleJitter):
    """:class:`torchvision.transforms.v2.ScaleJitter` with pixel-centred mask resizing."""


@TRANSFORMS.register_module()
class ResizeCenterCrop(v2.Compose):
    """timm's evaluation geometry: resize the short side to ``floor(size / crop_pct)``, then centre crop ``size``.

    This is ``timm.data.transforms_factory.transforms_imagenet_eval`` for a square ``size`` (224 -> 256 -> 224 at
    the default crop_pct 0.875), and the ``Resize(256, bicubic)`` + ``CenterCrop(224)`` of DINO's and MAE's
    evaluation. On a PIL image it gives timm's pixels exactly; on a tensor the antialiased resize agrees with PIL's
    within rounding. Masks are resized pixel-centred (nearest-exact) like :class:`Resize`'s.

    Args:
        size: the side of the square crop.
        crop_pct: the fraction of the resized short side that the crop keeps, in (0, 1].
        interpolation: a :class:`~torchvision.transforms.v2.InterpolationMode` value, e.g. ``'bicubic'`` (timm's
            default for most ImageNet models) or ``'bilinear'``.
    """

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = 'bicubic'):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f'ResizeCenterCrop size must be a positive int, got {size!r}')
        if not 0 < crop_pct <= 1:
            raise ValueError(f'ResizeCenterCrop crop_pct must be in (0, 1], got {crop_pct}')
        try:
            mode = v2.InterpolationMode(interpolation)
        except ValueError:
            raise ValueError(f'ResizeCenterCrop interpolation must be one of '
                             f'{[mode.value for mode in v2.InterpolationMode]}, got {interpolation!r}') from None
        # floor, as timm does: round() would give 249 rather than 248 for 224 / 0.9
        self.resize_size = math.floor(size / crop_pct)
        super().__init__([Resize(self.resize_size, interpolation=mode, antialias=True), v2.CenterCrop(size)])


@TRANSFORMS.register_module()
class ToFloat(v2.ToDtype):
    """Convert a uint8 image to float32 in [0, 1]; boxes, masks and depth maps pass through unchanged."""

    def __init__(self):
        # a plain dtype converts images and videos only; scale maps 0..255 to 0..1
        super().__init__(torch.float32, scale=True)


@TRANSFORMS.register_module()
class MultiView:
    """Several independent augmentations of one input, as a tuple: the two views of SimCLR and MoCo.
    ``collate_views`` stacks them view-major.

    Either ``pipeline`` drawn ``num_views`` times (SimCLR's symmetric views), or ``pipelines``, one per view (MoCo v3's
    and BYOL's asymmetric views: the first always blurred, the second rarely blurred and sometimes solarized).

    Example (SimCLR's augmentations at 64 px)::

        dict(type='MultiView', num_views=2, pipeline=[
            dict(type='RandomResizedCrop', size=64, scale=(0.2, 1.0)), dict(type='RandomHorizontalFlip'),
            dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            dict(type='RandomGrayscale', p=0.2), dict(type='ToFloat'), dict(type='Normalize', ...)])
    """

    def __init__(self, pipeline: Sequence[dict | Callable] | None = None, num_views: int = 2,
                 pipelines: Sequence[Sequence[dict | Callable]] | None = None):
        if (pipeline is None) == (pipelines is None):
            raise ValueError('MultiView takes either pipeline (drawn num_views times) or pipelines (one per view)')
        if pipelines is not None:
            if len(pipelines) < 2:
                raise ValueError(f'MultiView needs at least 2 pipelines, got {len(pipelines)}')
            self.pipelines = [build_pipeline(view) for view in pipelines]
        else:
            if num_views < 2:
                raise ValueError(f'MultiView needs num_views >= 2, got {num_views}')
            self.pipelines = [build_pipeline(pipeline)] * num_views

    @property
    def num_views(self) -> int:
        return len(self.pipelines)

    def __call__(self, inputs):
        return tuple(view(inputs) for view in self.pipelines)

    def __repr__(self) -> str:
        return f'MultiView(pipelines={self.pipelines!r})'


@TRANSFORMS.register_module()
class MultiCrop(MultiView):
    """DINO's multi-crop (Caron et al. 2021): two global crops and ``num_local_crops`` smaller local crops of one
    input, as a tuple, the global crops first; ``collate_crops`` batches the two sizes apart.

    The global crops are ``global_pipeline`` drawn twice, or ``global_pipelines`` (DINO's asymmetric pair: the first
    always blurred, the second rarely blurred and sometimes solarized); the local crops are ``local_pipeline``
    drawn ``num_local_crops`` times (DINO: 96 px crops of scale (0.05, 0.32) beside 224 px global crops of scale
    (0.32, 1); DINOv2: 8 local crops).
    """

    num_global_crops = 2

    def __init__(self, global_pipeline: Sequence[dict | Callable] | None = None,
                 global_pipelines: Sequence[Sequence[dict | Callable]] | None = None,
                 local_pipeline: Sequence[dict | Callable] | None = None, num_local_crops: int = 0):
        if (global_pipeline is None) == (global_pipelines is None):
            raise ValueError('MultiCrop takes either global_pipeline (drawn twice) or global_pipelines (one per '
                             'global crop)')
        if global_pipelines is not None and len(global_pipelines) != self.num_global_crops:
            raise ValueError(f'MultiCrop takes {self.num_global_crops} global_pipelines, got {len(global_pipelines)}')
        if num_local_crops < 0 or (num_local_crops > 0) != (local_pipeline is not None):
            raise ValueError(f'MultiCrop needs a local_pipeline exactly when num_local_crops > 0, got '
                             f'num_local_crops={num_local_crops} and local_pipeline={local_pipeline!r}')
        global_views = global_pipelines or [global_pipeline] * self.num_global_crops
        super().__init__(pipelines=[*global_views, *[local_pipeline] * num_local_crops])

    def __repr__(self) -> str:
        return f'MultiCrop(pipelines={self.pipelines!r})'


@TRANSFORMS.register_module()
class RandomApply(v2.RandomApply):
    """:class:`torchvision.transforms.v2.RandomApply` whose ``transforms`` may be config dicts: all of them, in
    order, with probability ``p`` (MoCo's ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)``)."""

    def __init__(self, transforms: Sequence[dict | Callable], p: float = 0.5):
        super().__init__(list(build_pipeline(transforms).transforms), p=p)


@TRANSFORMS.register_module()
class GaussianBlur(v2.GaussianBlur):
    """:class:`torchvision.transforms.v2.GaussianBlur` (same arguments, same sigma drawn), computed by OpenCV.

    OpenCV blurs the HWC image with a separable kernel in SIMD code (fixed point for uint8); torchvision convolves
    the CHW tensor with the full 2-D kernel: 23 x 23 taps at SimCLR's and MoCo's kernel size, several times the cost
    of the rest of their augmentations. The kernel is torchvision's (``exp(-x^2 / 2 sigma^2)`` over
    ``kernel_size`` taps, normalised) and so is the border (reflection without repeating the edge), so the output
    matches within a grey level on uint8 images. Masks and boxes pass through unchanged.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor:  # what v2 takes for the image
            return _blur_with_opencv(inpt, self.kernel_size, params['sigma'])
        return super().transform(inpt, params)


def _blur_with_opencv(image: torch.Tensor, kernel_size: Sequence[int], sigma: Sequence[float]) -> torch.Tensor:
    if image.ndim != 3 or image.dtype not in (torch.uint8, torch.float32):
        return F.gaussian_blur(image, list(kernel_size), list(sigma))  # batches, other dtypes: torchvision's own
    height_width_channels = image.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()
    # cv2's kernel is taken as given, not rebuilt from sigma: getGaussianKernel is torchvision's formula
    kernel_x = cv2.getGaussianKernel(kernel_size[0], sigma[0], cv2.CV_32F)
    kernel_y = cv2.getGaussianKernel(kernel_size[1], sigma[1], cv2.CV_32F)
    blurred = cv2.sepFilter2D(height_width_channels, -1, kernel_x, kernel_y, borderType=cv2.BORDER_REFLECT_101)
    if blurred.ndim == 2:  # cv2 drops a single channel
        blurred = blurred[..., None]
    channels_first = torch.from_numpy(blurred).permute(2, 0, 1).contiguous()
    return tv_tensors.wrap(channels_first, like=image) if isinstance(image, tv_tensors.TVTensor) else channels_first


class _ImageOnlyAutoAugment:
    """v2's auto-augment policies transform the image and pass every other input through untouched, so their
    geometric operations (shear, translate, rotate) would leave boxes, masks and dense maps behind: refuse them."""

    def forward(self, *inputs: Any) -> Any:
        flat = torch.utils._pytree.tree_flatten(inputs if len(inputs) > 1 else inputs[0])[0]
        moved_alone = sorted({type(item).__name__ for item in flat
                              if isinstance(item, tv_tensors.TVTensor) and not isinstance(item, tv_tensors.Image)})
        if moved_alone:
            raise TypeError(f'{type(self).__name__} moves the image only, so its geometric operations would '
                            f'misalign the {", ".join(moved_alone)} of the sample: use it for classification '
                            f'(targets that are class indices or label vectors)')
        return super().forward(*inputs)


@TRANSFORMS.register_module()
class RandAugment(_ImageOnlyAutoAugment, v2.RandAugment):
    """:class:`torchvision.transforms.v2.RandAugment` (Cubuk et al. 2020): ``num_ops`` operations drawn per image at
    ``magnitude`` out of ``num_magnitude_bins - 1``; DeiT's ``rand-m9-mstd0.5-inc1`` is close to ``num_ops=2,
    magnitude=9``. Put it before ``ToFloat``, on uint8 images; classification only."""


@TRANSFORMS.register_module()
class TrivialAugmentWide(_ImageOnlyAutoAugment, v2.TrivialAugmentWide):
    """:class:`torchvision.transforms.v2.TrivialAugmentWide` (Mueller and Hutter 2021): one operation at a random
    magnitude per image. Put it before ``ToFloat``, on uint8 images; classification only."""


class _Solarize(v2.Transform):
    """Invert the pixels at or above half the dtype's range (128 of uint8, 0.5 of float): PIL's
    ``ImageOps.solarize`` default, which DeiT III uses."""

    _transformed_types = (tv_tensors.Image, torch.Tensor)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.TVTensor) and not isinstance(inpt, tv_tensors.Image):
            return inpt
        return F.solarize(inpt, threshold=128 if inpt.dtype == torch.uint8 else 0.5)


@TRANSFORMS.register_module()
class ThreeAugment(v2.Compose):
    """DeiT III's 3-Augment (Touvron et al. 2022, "DeiT III: Revenge of the ViT"): one of grayscale, solarization
    and Gaussian blur, drawn with equal probability, then a colour jitter. The image only: labels pass through.

    DeiT III blurs with PIL's ``GaussianBlur`` at a radius (sigma) drawn in [0.1, 2] and jitters brightness,
    contrast and saturation by 0.3 (its ``--color-jitter`` default; 0 leaves the jitter out).

    Args:
        color_jitter: brightness, contrast and saturation strength of the jitter after the choice; 0: none.
        blur_sigma: range of the blur's sigma, in pixels.
    """

    def __init__(self, color_jitter: float = 0.3, blur_sigma: Sequence[float] = (0.1, 2.0)):
        if color_jitter < 0:
            raise ValueError(f'ThreeAugment color_jitter must be >= 0, got {color_jitter}')
        low, high = blur_sigma
        if not 0 < low <= high:
            raise ValueError(f'ThreeAugment blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}')
        kernel_size = 2 * math.ceil(3 * high) + 1  # +-3 sigma of the widest blur, as PIL's radius covers
        steps = [v2.RandomChoice([v2.Grayscale(num_output_channels=3), _Solarize(),
                                  GaussianBlur(kernel_size, sigma=(low, high))])]
        if color_jitter:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
        super().__init__(steps)


_TV_TENSOR_TYPES = {cls.__name__: cls for cls in (tv_tensors.Image, tv_tensors.Mask, tv_tensors.BoundingBoxes)}


def _config_fill(cfg: dict) -> dict:
    fill = cfg.get('fill')
    if isinstance(fill, dict) and all(isinstance(key, str) for key in fill):
        unknown = set(fill) - set(_TV_TENSOR_TYPES) - {'others'}
        if unknown:
            raise KeyError(f'fill keys {sorted(unknown)} in {cfg!r} are not tv_tensor types '
                           f'{sorted(_TV_TENSOR_TYPES)}')
        cfg = dict(cfg, fill={_TV_TENSOR_TYPES.get(key, key): value for key, value in fill.items()})
    return cfg


def build_pipeline(cfgs: Sequence[dict | Callable] | Callable = ()) -> Callable:
    """Build a v2 pipeline from config dicts (``type`` names a TRANSFORMS entry) or ready transforms.

    A single callable (an already built pipeline) is returned as it is; an empty list returns its input unchanged.
    """
    if callable(cfgs):
        return cfgs
    if isinstance(cfgs, (dict, str)) or not isinstance(cfgs, Sequence):
        raise TypeError(f'a pipeline is a list of transform configs, got {type(cfgs).__name__}: {cfgs!r}')
    transforms: list[Any] = []
    for cfg in cfgs:
        if isinstance(cfg, dict):
            _refuse_batch_augment(cfg)
            transforms.append(TRANSFORMS.build(_config_fill(dict(cfg))))
        elif callable(cfg):
            transforms.append(cfg)
        else:
            raise TypeError(f'pipeline entries are config dicts or callables, got {cfg!r}')
    return v2.Compose(transforms or [v2.Identity()])


def _refuse_batch_augment(cfg: dict) -> None:
    from mtvision.data.batch_augments import BATCH_AUGMENTS  # it builds nothing of this module: no cycle

    name = cfg.get('type')
    if isinstance(name, str) and name not in TRANSFORMS.module_dict and name in BATCH_AUGMENTS.module_dict:
        raise KeyError(f'{name} works on normalised batches, not in a pipeline: list {cfg!r} in the task\'s '
                       f'batch_augments (tasks.<name>.batch_augments)')
