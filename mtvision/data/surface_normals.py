"""Surface normal maps: their PNG encoding and a tv_tensor that the joint transforms move correctly.

Normals are unit vectors in the camera frame (x right, y down, z forward, OpenCV's convention), pointing toward the
camera. A PNG stores them as NYUv2 toolboxes do, ``rgb = round((n + 1) / 2 * 255)`` in RGB channel order, so that
``n = rgb / 255 * 2 - 1``; the pixel ``(0, 0, 0)`` marks "no normal" (sky, missing depth). It cannot be a valid
normal: it would decode to ``(-1, -1, -1)``, which is no unit vector.

:class:`SurfaceNormals` is a float32 ``[3, H, W]`` map; the zero vector marks invalid pixels. Geometric transforms
move it like a dense map and change the vectors where the 3-D scene they imply changes:

- horizontal flip mirrors the scene in x, so ``n_x`` changes sign; vertical flip negates ``n_y``;
- resize and crop only change the camera's intrinsics (focal length, principal point), not the surfaces, so the
  vectors stay as they are; resizing samples them pixel-centred (``nearest-exact``, as the loaders' masks), which
  never blends a surface with its neighbour or with invalid pixels;
- padding fills invalid (zero) normals whatever ``fill`` says, and takes ``padding_mode='constant'`` only;
- rotation, affine, perspective and elastic transforms raise TypeError: they would need the vectors rotated or a
  non-rigid warp that no camera motion explains. Every other transform (photometric ones, ``ToFloat``,
  ``Normalize``) leaves the map unchanged.
"""
import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ['SurfaceNormals', 'decode_normals', 'encode_normals']


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals float [H, W, 3] (zero vector = invalid) -> uint8 RGB [H, W, 3], ``(0, 0, 0)`` = invalid."""
    valid = np.any(normals != 0, axis=-1, keepdims=True)
    encoded = np.round((np.clip(normals, -1, 1) + 1) / 2 * 255).astype(np.uint8)
    return np.where(valid, encoded, np.uint8(0))


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [3, H, W] unit normals, the zero vector where the pixel is ``(0, 0, 0)``.

    Decoded vectors are renormalised: 8-bit rounding leaves them up to about 0.7% off unit length.
    """
    normals = rgb.astype(np.float32) / 255 * 2 - 1
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = np.any(rgb != 0, axis=-1, keepdims=True)
    normals = np.where(valid, normals / np.maximum(length, 1e-6), np.float32(0))
    return np.ascontiguousarray(normals.transpose(2, 0, 1))


class SurfaceNormals(tv_tensors.TVTensor):
    """A float32 ``[3, H, W]`` map of camera-frame unit normals (zero = invalid); see the module docstring for
    what each geometric transform does to it."""

    def __new__(cls, data, *, dtype=None, device=None, requires_grad=None):
        tensor = cls._to_tensor(data, dtype=dtype, device=device, requires_grad=requires_grad)
        if tensor.ndim < 3 or tensor.shape[-3] != 3:
            raise ValueError(f'SurfaceNormals must be [..., 3, H, W], got shape {tuple(tensor.shape)}')
        return tensor.as_subclass(cls)


def _plain(normals: Tensor) -> Tensor:
    return normals.as_subclass(Tensor)


def _negate_channel(normals: Tensor, channel: int) -> Tensor:
    sign = torch.ones(3, 1, 1, dtype=normals.dtype, device=normals.device)
    sign[channel] = -1
    return normals * sign  # -0.0 * 0 stays a zero vector: invalid pixels stay invalid


@F.register_kernel(F.horizontal_flip, SurfaceNormals)
def _horizontal_flip(normals, **_):
    return tv_tensors.wrap(_negate_channel(F.horizontal_flip_mask(_plain(normals)), 0), like=normals)


@F.register_kernel(F.vertical_flip, SurfaceNormals)
def _vertical_flip(normals, **_):
    return tv_tensors.wrap(_negate_channel(F.vertical_flip_mask(_plain(normals)), 1), like=normals)


@F.register_kernel(F.resize, SurfaceNormals)
def _resize(normals, size, interpolation=None, max_size=None, **_):
    resized = F.resize_mask(_plain(normals), size, interpolation=v2.InterpolationMode.NEAREST_EXACT,
                            max_size=max_size)
    return tv_tensors.wrap(resized, like=normals)


@F.register_kernel(F.crop, SurfaceNormals)
def _crop(normals, top, left, height, width, **_):
    return tv_tensors.wrap(F.crop_mask(_plain(normals), top, left, height, width), like=normals)


@F.register_kernel(F.center_crop, SurfaceNormals)
def _center_crop(normals, output_size, **_):
    return tv_tensors.wrap(F.center_crop_mask(_plain(normals), output_size), like=normals)


@F.register_kernel(F.resized_crop, SurfaceNormals)
def _resized_crop(normals, top, left, height, width, size, **_):
    return _resize(_crop(normals, top, left, height, width), size)


@F.register_kernel(F.pad, SurfaceNormals)
def _pad(normals, padding, fill=None, padding_mode='constant', **_):
    if padding_mode != 'constant':
        raise TypeError(f'SurfaceNormals can only be padded with constant (invalid) normals, got '
                        f'padding_mode={padding_mode!r}: a reflected border would need its normals mirrored')
    return tv_tensors.wrap(F.pad_mask(_plain(normals), padding, fill=0), like=normals)


@F.register_kernel(F.get_size, SurfaceNormals)
def _get_size(normals, **_):
    return list(normals.shape[-2:])


def _refuse(functional):
    def kernel(normals, *args, **kwargs):
        raise TypeError(f'F.{functional.__name__} is not supported on SurfaceNormals: the normal vectors would '
                        f'need rotating with the image; use flips, crops and resizes in a pipeline with normals')
    F.register_kernel(functional, SurfaceNormals)(kernel)


for _functional in (F.rotate, F.affine, F.perspective, F.elastic):
    _refuse(_functional)
