"""Deterministic synthetic scenes of shapes, written in the file layouts of ImageNet, COCO, ADE20K and NYUv2.

A scene is a sloped ground plane seen in perspective (random camera height, focal length, horizon row and roll)
with 1-4 flat shapes standing on it, each facing the camera. Shapes have K classes (circle, square, triangle, star,
hexagon, cross, then ring and arrow when K > 6), shading, aspect ratio, tilt (up to 30 degrees) and physical size
(0.4-1.6 m); their apparent size is ``focal * physical_size / depth``, so nearer shapes look larger. Half of the
shapes take a colour near their class's hue, the others a random colour: colour is a cue that a tiny model picks
up within minutes, while the rest of the accuracy needs the shape. Textures use two related tones, so that they
stay visible without drowning the shapes. Shapes are
drawn far-to-near into a z-buffer initialised with the ground depth, so nearer shapes occlude farther ones; every
shape keeps at least 40% of its pixels visible. The ground carries a checker, stripe or wave texture laid out in
ground coordinates (so it shrinks toward the horizon and fades into haze); beyond the far limit (10-20 m) lies the
sky / far wall, textured in image space (noise, stripes, checker or gradient). Shapes span about 1/8 to 5/8 of
the image side (8-40 px at 64x64).

Labels of a scene:

- classification: the class of the instance with the largest visible area. Classification scenes hold one large
  dominant shape (its class cycles through the classes with the file index, so the split is balanced) and up to
  two small distractors, each kept well below the dominant shape's visible area.
- detection: every instance; its mask is its visible pixels and its box the tight box of that mask in pixel-edge
  coordinates (``x2 = last column + 1``), COCO ``bbox = [x1, y1, x2 - x1, y2 - y1]``, masks stored as RLE.
- segmentation: 0 = background (ground and sky), ``c + 1`` = shape class ``c``, 255 = ignore on a one-pixel band
  just outside every shape's visible outline (on the background, or on a shape of another class that it
  occludes), where JPEG colours of both sides mix. A shape's own outline stays labelled, so a shape in front of
  everything keeps all its pixels.
- depth: z-depth in metres (distance along the optical axis); 0 = invalid on the sky / far wall, like the missing
  pixels of NYUv2. Stored as uint16 PNG in millimetres.
- surface normals (shared-images layout): unit vectors in the camera frame (x right, y down, z forward), pointing
  toward the camera, computed analytically from the scene geometry: the ground plane's normal
  ``(sin roll, -cos roll, 0)`` on the ground, ``(0, 0, -1)`` on the shapes (flat cards facing the camera), the zero
  vector where depth is invalid. Stored as NYUv2-style RGB PNG, ``rgb = round((n + 1) / 2 * 255)``, with
  ``(0, 0, 0)`` = invalid (:mod:`mtvision.data.surface_normals`).
- multi-label classes (shared-images layout): the classes whose segmentation label covers at least
  ``_MULTILABEL_MIN_PIXELS`` pixels of the scene.

Layout written by :func:`generate_synthetic` (``shared_images=False``, the default): each task and split draws its
own scenes (separate random streams), like four unrelated datasets::

    meta.json
    classification/{train,val}/<class_name>/<stem>.jpg
    detection/images/{train,val}/<stem>.jpg
    detection/annotations/instances_{train,val}.json
    segmentation/images/{train,val}/<stem>.jpg
    segmentation/annotations/{train,val}/<stem>.png
    depth/{train,val}/rgb/<stem>.jpg
    depth/{train,val}/depth/<stem>.png

With ``shared_images=True`` one set of multi-object scenes carries all label types (NYUv2-like)::

    meta.json
    images/{train,val}/<stem>.jpg
    classification/{train,val}.txt                  '<stem>.jpg <label>' per line, relative to images/<split>
    detection/annotations/instances_{train,val}.json   file_name relative to images/<split>
    segmentation/annotations/{train,val}/<stem>.png
    depth/{train,val}/depth/<stem>.png
    normals/{train,val}/<stem>.png                   RGB PNG of camera-frame normals, (0, 0, 0) = invalid
    multilabel/{train,val}.txt                       '<stem>.jpg <c1> <c2> ...' per line: sorted class indices

``meta.json`` records the options, the class names and, under ``paths[task][split]``, the loader arguments
(paths relative to the root) for both layouts, e.g. ``paths['depth']['val'] == {'img_dir': 'depth/val/rgb',
'depth_dir': 'depth/val/depth'}``. Stems are the zero-padded file index, e.g. ``000042``. The same options give
byte-identical files.
"""
import colorsys
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from mtvision.data.surface_normals import encode_normals

__all__ = ['SHAPES', 'Instance', 'Scene', 'render_scene', 'synthetic_scene', 'generate_synthetic',
           'ensure_synthetic']

logger = logging.getLogger(__name__)

# Bump whenever rendering or layout changes, so that ensure_synthetic regenerates cached datasets.
GENERATOR_VERSION = 3
SHAPES = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross', 'ring', 'arrow')
TASKS = ('classification', 'detection', 'segmentation', 'depth')
SPLITS = ('train', 'val')
DEPTH_SCALE = 1000.0  # PNG units per metre
IGNORE_INDEX = 255
JPEG_QUALITY = 95

_STREAMS = (*TASKS, 'shared')
_MIN_SIZE, _MAX_SIZE = 1 / 8, 5 / 8  # apparent shape size (diameter) as a fraction of the image side
_DOMINANT_SIZE = (0.42, _MAX_SIZE)
_DISTRACTOR_SIZE = (_MIN_SIZE, 0.25)
_PHYSICAL_SIZE = (0.4, 1.6)  # metres
_MIN_VISIBLE_FRACTION = 0.4
_CLASS_HUE_PROBABILITY = 0.5
_MAX_TILT = math.radians(30)  # shapes stand on the ground, roughly upright
_TEXTURE_CONTRAST = 70  # largest per-channel difference between the two tones of a texture
_DOMINANT_MARGIN = 0.8  # distractors stay below this fraction of the dominant shape's visible area
# one labelled pixel suffices: every shape keeps 40% of its area (at least 12 px at 64 px) visible, so a class is
# never present by a stray pixel (the fewest labelled pixels of a present class in 300 scenes is 25)
_MULTILABEL_MIN_PIXELS = 1
_FACING_CAMERA = np.array([0.0, 0.0, -1.0], dtype=np.float32)  # the normal of a card facing the camera


def _regular_polygon(num_vertices: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(num_vertices) / num_vertices
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return _regular_polygon(10) * radii[:, None]


_ARM = 0.33
_OUTLINES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {  # unit-radius outline, optional hole
    'circle': (_regular_polygon(32), None),
    'square': (_regular_polygon(4, phase=math.pi / 4), None),
    'triangle': (_regular_polygon(3), None),
    'star': (_star(), None),
    'hexagon': (_regular_polygon(6), None),
    'cross': (np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
                        (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)], dtype=float), None),
    'ring': (_regular_polygon(32), _regular_polygon(32, radius=0.5)),
    'arrow': (np.array([(-1, -0.3), (0.15, -0.3), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.3), (-1, 0.3)],
                       dtype=float), None),
}


@dataclass
class Instance:
    """One visible shape of a scene."""
    label: int  # class index, 0..K-1
    mask: np.ndarray  # bool [H, W], the visible pixels
    box: tuple[float, float, float, float]  # XYXY of the visible mask, pixel edges


@dataclass
class Scene:
    """A rendered scene with all its labels (see the module docstring for the label rules)."""
    image: np.ndarray  # uint8 [H, W, 3] RGB
    instances: list[Instance]  # far to near
    semantic: np.ndarray  # uint8 [H, W]: 0 background, 1..K shapes, 255 ignore
    depth: np.ndarray  # float32 [H, W] metres, 0 = invalid
    normals: np.ndarray  # float32 [H, W, 3] camera-frame unit normals toward the camera, zero vector = invalid

    @property
    def label(self) -> int:
        """Classification label: the class of the instance with the largest visible area."""
        return max(self.instances, key=lambda instance: int(instance.mask.sum())).label

    @property
    def present_classes(self) -> list[int]:
        """Multi-label classes: the sorted class indices labelled on at least ``_MULTILABEL_MIN_PIXELS`` pixels
        of the segmentation map."""
        counts = np.bincount(self.semantic.ravel(), minlength=256)[1:IGNORE_INDEX]
        return np.flatnonzero(counts >= _MULTILABEL_MIN_PIXELS).tolist()


@dataclass
class _Camera:
    focal: float  # pixels
    height: float  # metres above the ground
    horizon: float  # image row of the horizon at the centre column
    roll: float  # radians
    far: float  # metres; the ground ends here and the sky / far wall begins

    def ground_offset(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixel offsets (u right, v down) from the horizon centre, in the camera's unrolled frame."""
        ys, xs = _pixel_grid(size)
        dx, dy = xs - size / 2, ys - self.horizon
        cos, sin = math.cos(self.roll), math.sin(self.roll)
        return dx * cos + dy * sin, dy * cos - dx * sin

    def to_image(self, u: float, v: float, size: int) -> tuple[float, float]:
        cos, sin = math.cos(self.roll), math.sin(self.roll)
        return size / 2 + u * cos - v * sin, self.horizon + u * sin + v * cos

    @property
    def ground_normal(self) -> np.ndarray:
        """The ground's unit normal in the camera frame: "up", (0, -1, 0) in the unrolled frame, rolled into the
        image's axes as :meth:`to_image` rolls offsets."""
        return np.array([math.sin(self.roll), -math.cos(self.roll), 0.0], dtype=np.float32)


@dataclass
class _Shape:
    label: int
    depth: float
    mask: np.ndarray  # bool [H, W], all pixels of the shape before occlusion
    colour: np.ndarray  # float [3]
    light_angle: float
    centre: tuple[float, float]
    radius: float
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _check_options(image_size: int, num_classes: int) -> None:
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be in 1..{len(SHAPES)} (shapes {SHAPES}), got {num_classes}')
    if image_size < 32:
        raise ValueError(f'image_size must be at least 32 so that the smallest shapes stay visible, got {image_size}')


def _sample_camera(rng: np.random.Generator, size: int) -> _Camera:
    return _Camera(focal=size * rng.uniform(0.9, 1.3), height=rng.uniform(1.0, 1.8),
                   horizon=size * rng.uniform(0.05, 0.3), roll=math.radians(rng.uniform(-8, 8)),
                   far=rng.uniform(10.0, 20.0))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _shape_colour(rng: np.random.Generator, label: int, num_classes: int) -> np.ndarray:
    if rng.random() >= _CLASS_HUE_PROBABILITY:
        return _random_colour(rng)
    # the class's own hue: a cue that makes early learning quick, never enough alone since half the shapes
    # are coloured at random
    hue = (label + rng.uniform(-0.3, 0.3)) / num_classes
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    return np.array(rgb, dtype=np.float32) * 255


def _texture_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # two related tones: textures stay visible (a depth cue) without competing with the shapes for attention
    first = _random_colour(rng)
    return first, (first + rng.uniform(-_TEXTURE_CONTRAST, _TEXTURE_CONTRAST, size=3)).clip(0, 255).astype(np.float32)


def _two_tone(pattern: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return first + pattern[..., None] * (second - first)


def _ground_pattern(rng: np.random.Generator, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A [0, 1] texture in ground coordinates (metres), so that it recedes with perspective."""
    kind = rng.integers(3)
    if kind == 0:  # checker
        tile = rng.uniform(0.3, 0.9)
        return ((np.floor(x / tile) + np.floor(z / tile)) % 2).astype(np.float32)
    if kind == 1:  # stripes
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.3, 1.2)
        return (np.floor((x * math.cos(angle) + z * math.sin(angle)) / period) % 2).astype(np.float32)
    waves = np.zeros_like(x)
    for _ in range(3):
        angle, frequency, phase = rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 6.0), rng.uniform(0, 2 * math.pi)
        waves += np.sin(frequency * (x * math.cos(angle) + z * math.sin(angle)) + phase)
    return (waves / 6 + 0.5).astype(np.float32)


def _sky_pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A [0, 1] texture in image space for the sky / far wall."""
    ys, xs = _pixel_grid(size)
    kind = rng.integers(4)
    period = size * rng.uniform(0.05, 0.16)
    if kind == 0:  # checker
        return ((np.floor(xs / period) + np.floor(ys / period)) % 2).astype(np.float32)
    if kind == 1:  # stripes
        angle = rng.uniform(0, math.pi)
        return (np.floor((xs * math.cos(angle) + ys * math.sin(angle)) / period) % 2).astype(np.float32)
    if kind == 2:  # smooth noise
        cells = int(rng.integers(3, 9))
        coarse = rng.random((cells, cells), dtype=np.float32)
        return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    return ys / size  # vertical gradient


def _render_background(rng: np.random.Generator, camera: _Camera, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Float RGB image of ground and sky, and the ground depth (0 on the sky)."""
    u, v = camera.ground_offset(size)
    ground = v > camera.focal * camera.height / camera.far
    z = np.where(ground, camera.focal * camera.height / np.maximum(v, 1e-3), 0).astype(np.float32)
    x = u * z / camera.focal
    sky_colours = _texture_colours(rng)
    sky = _two_tone(_sky_pattern(rng, size), *sky_colours)
    ground_colour = _two_tone(_ground_pattern(rng, x, z), *_texture_colours(rng))
    # haze: far ground fades toward the sky's mean colour, a depth cue that also hides texture aliasing
    haze = (0.6 * z / camera.far)[..., None]
    ground_colour = ground_colour * (1 - haze) + (sky_colours[0] + sky_colours[1]) / 2 * haze
    return np.where(ground[..., None], ground_colour, sky), z


def _rasterise(outline: np.ndarray, hole: np.ndarray | None, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    scale = 16  # cv2 draws with 4 fractional bits, so shapes move and scale smoothly
    cv2.fillPoly(mask, [np.round(outline * scale).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    if hole is not None:
        cv2.fillPoly(mask, [np.round(hole * scale).astype(np.int32)], 0, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _sample_shape(rng: np.random.Generator, camera: _Camera, size: int, label: int, num_classes: int,
                  size_range: tuple[float, float], min_area: int) -> _Shape | None:
    """A shape standing on the ground with an apparent size in ``size_range``; None when no placement fits."""
    outline, hole = _OUTLINES[SHAPES[label]]
    far_offset = camera.focal * camera.height / camera.far
    for _ in range(20):
        diameter = size * math.exp(rng.uniform(math.log(size_range[0]), math.log(size_range[1])))
        # the foot of a shape of physical size s sits height * diameter / s pixels below the horizon
        lowest = max(_PHYSICAL_SIZE[0], camera.height * diameter / (size - camera.horizon))
        highest = min(_PHYSICAL_SIZE[1], camera.height * diameter / (1.05 * far_offset))
        if lowest > highest:
            continue
        physical = rng.uniform(lowest, highest)
        depth = camera.focal * physical / diameter
        margin = 0.3 * diameter
        foot_x, foot_y = camera.to_image(rng.uniform(-size / 2 + margin, size / 2 - margin),
                                         camera.height * diameter / physical, size)
        if not 0 <= foot_y <= size - 1:
            continue
        angle = rng.uniform(-_MAX_TILT, _MAX_TILT)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        stretch = np.array([rng.uniform(0.8, 1.25), 1.0]) * diameter / 2
        outline_px = (outline * stretch) @ rotation.T
        hole_px = None if hole is None else (hole * stretch) @ rotation.T
        offset = np.array([foot_x, foot_y - outline_px[:, 1].max()])
        mask = _rasterise(outline_px + offset, None if hole_px is None else hole_px + offset, size)
        if mask.sum() < min_area:
            continue
        return _Shape(label=label, depth=depth, mask=mask, colour=_shape_colour(rng, label, num_classes),
                      light_angle=rng.uniform(0, 2 * math.pi), centre=(float(offset[0]), float(offset[1])),
                      radius=diameter / 2)
    return None


def _visible_ids(shapes: list[_Shape], size: int) -> np.ndarray:
    """Index of the shape seen at each pixel (-1 = ground or sky); ``shapes`` must be sorted far to near."""
    ids = np.full((size, size), -1, dtype=np.int16)
    for index, shape in enumerate(shapes):
        ids[shape.mask] = index
    return ids


def _far_to_near(shapes: list[_Shape]) -> list[_Shape]:
    return sorted(shapes, key=lambda shape: -shape.depth)


def _layout_is_valid(shapes: list[_Shape], dominant: _Shape | None, size: int) -> bool:
    ordered = _far_to_near(shapes)
    visible = np.bincount(_visible_ids(ordered, size).ravel() + 1, minlength=len(ordered) + 1)[1:]
    if any(count < _MIN_VISIBLE_FRACTION * shape.area for shape, count in zip(ordered, visible)):
        return False
    if dominant is None:
        return True
    dominant_visible = visible[next(i for i, shape in enumerate(ordered) if shape is dominant)]
    return all(count < _DOMINANT_MARGIN * dominant_visible
               for shape, count in zip(ordered, visible) if shape is not dominant)


def _ignore_band(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour that lies in front of them (higher id) and carries another label."""
    height, width = labels.shape
    # edge padding makes the image border its own neighbour, so it never counts as a boundary
    padded_ids, padded_labels = np.pad(ids, 1, mode='edge'), np.pad(labels, 1, mode='edge')
    band = np.zeros(labels.shape, dtype=bool)
    for top, left in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour_ids = padded_ids[top:top + height, left:left + width]
        neighbour_labels = padded_labels[top:top + height, left:left + width]
        band |= (neighbour_ids > ids) & (neighbour_labels != labels)
    return band


def render_scene(rng: np.random.Generator, image_size: int = 64, num_classes: int = 6, *,
                 dominant_label: int | None = None) -> Scene:
    """Render one scene.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        image_size: side of the square image in pixels.
        num_classes: number of shape classes K (the first K of :data:`SHAPES`).
        dominant_label: draw a classification scene: one large shape of this class plus up to two small
            distractors. None draws 1-4 shapes of random classes and sizes.
    """
    _check_options(image_size, num_classes)
    if dominant_label is not None and not 0 <= dominant_label < num_classes:
        raise ValueError(f'dominant_label must be in 0..{num_classes - 1}, got {dominant_label}')
    size = image_size
    min_area = max(6, round(12 * (size / 64) ** 2))
    while True:  # a camera can rarely leave no room for a dominant shape; draw another then
        camera = _sample_camera(rng, size)
        if dominant_label is None:
            dominant = None
            wanted, size_range = int(rng.integers(1, 5)), (_MIN_SIZE, _MAX_SIZE)
        else:
            dominant = _sample_shape(rng, camera, size, dominant_label, num_classes, _DOMINANT_SIZE, min_area)
            if dominant is None:
                continue
            wanted, size_range = int(rng.integers(0, 3)), _DISTRACTOR_SIZE
        shapes = [] if dominant is None else [dominant]
        for _ in range(wanted):
            for _attempt in range(10):
                label = int(rng.integers(num_classes))
                candidate = _sample_shape(rng, camera, size, label, num_classes, size_range, min_area)
                if candidate is not None and _layout_is_valid([*shapes, candidate], dominant, size):
                    shapes.append(candidate)
                    break
        if shapes:
            break

    image, depth = _render_background(rng, camera, size)
    normals = np.where((depth > 0)[..., None], camera.ground_normal, np.float32(0))
    shapes = _far_to_near(shapes)
    ids = _visible_ids(shapes, size)
    ys, xs = _pixel_grid(size)
    instances = []
    for index, shape in enumerate(shapes):
        visible = ids == index
        dx, dy = math.cos(shape.light_angle), math.sin(shape.light_angle)
        light = ((xs - shape.centre[0]) * dx + (ys - shape.centre[1]) * dy) / (2 * shape.radius) + 1
        image[visible] = (shape.colour * light[visible][:, None]).clip(0, 255)
        depth[visible] = shape.depth
        normals[visible] = _FACING_CAMERA
        rows, cols = np.nonzero(visible)
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        instances.append(Instance(label=shape.label, mask=visible, box=box))
    image += rng.normal(0, 3, size=image.shape).astype(np.float32)

    labels = np.zeros((size, size), dtype=np.uint8)
    shape_pixels = ids >= 0
    labels[shape_pixels] = np.array([shape.label + 1 for shape in shapes], dtype=np.uint8)[ids[shape_pixels]]
    labels[_ignore_band(labels, ids)] = IGNORE_INDEX
    return Scene(image=np.round(image).clip(0, 255).astype(np.uint8), instances=instances, semantic=labels,
                 depth=depth.astype(np.float32), normals=normals)


def synthetic_scene(seed: int, stream: str, split: str, index: int, image_size: int = 64,
                    num_classes: int = 6) -> Scene:
    """The scene that :func:`generate_synthetic` writes as file ``index`` of a task's split.

    Args:
        stream: a task name (the default layout's per-task scenes) or ``'shared'`` (the ``shared_images`` layout).
    """
    if stream not in _STREAMS or split not in SPLITS:
        raise ValueError(f'unknown stream {stream!r} or split {split!r}; expected one of {_STREAMS} and {SPLITS}')
    # one independent random stream per (seed, task, split, file), so files do not depend on each other
    rng = np.random.default_rng([seed, _STREAMS.index(stream), SPLITS.index(split), index])
    dominant_label = index % num_classes if stream == 'classification' else None
    return render_scene(rng, image_size, num_classes, dominant_label=dominant_label)


def _relative_paths(shared_images: bool) -> dict[str, dict[str, dict[str, str]]]:
    paths = {task: {} for task in TASKS}
    for split in SPLITS:
        images = f'images/{split}' if shared_images else None
        paths['classification'][split] = (dict(data_root=images, ann_file=f'classification/{split}.txt')
                                          if shared_images else dict(data_root=f'classification/{split}'))
        paths['detection'][split] = dict(img_dir=images or f'detection/images/{split}',
                                         ann_file=f'detection/annotations/instances_{split}.json')
        paths['segmentation'][split] = dict(img_dir=images or f'segmentation/images/{split}',
                                            ann_dir=f'segmentation/annotations/{split}')
        paths['depth'][split] = dict(img_dir=images or f'depth/{split}/rgb', depth_dir=f'depth/{split}/depth')
        if shared_images:
            paths.setdefault('normals', {})[split] = dict(img_dir=images, normal_dir=f'normals/{split}')
            paths.setdefault('multilabel', {})[split] = dict(data_root=images, ann_file=f'multilabel/{split}.txt')
    return paths


def _options(seed: int, num_train: int, num_val: int, image_size: int, num_classes: int,
             shared_images: bool) -> dict:
    _check_options(image_size, num_classes)
    if min(num_train, num_val) < 1:
        raise ValueError(f'num_train and num_val must be positive, got {num_train} and {num_val}')
    if not shared_images and min(num_train, num_val) < num_classes:
        raise ValueError(f'every class folder needs an image: num_train and num_val must be at least num_classes '
                         f'({num_classes}), got {num_train} and {num_val}')
    return dict(version=GENERATOR_VERSION, seed=int(seed), image_size=int(image_size),
                num_classes=int(num_classes), num_train=int(num_train), num_val=int(num_val),
                shared_images=bool(shared_images))


def _write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # full-resolution chroma: 2x2 chroma blocks would smear the colours of 8-pixel shapes
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
        raise OSError(f'cannot write {path}')


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f'cannot write {path}')


def _write_text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(lines))


def _write_json(path: Path, content: dict, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=indent, separators=(',', ': ') if indent else (',', ':')) + '\n')


def _depth_to_png(depth: np.ndarray) -> np.ndarray:
    return np.round(depth * DEPTH_SCALE).astype(np.uint16)


class _CocoWriter:
    """Collects COCO entries scene by scene, so that a split's scenes need not stay in memory."""

    def __init__(self, classes: list[str]):
        self.classes = classes
        self.images, self.annotations = [], []

    def add(self, file_name: str, scene: Scene) -> None:
        height, width = scene.semantic.shape
        image_id = len(self.images) + 1
        self.images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
        for instance in scene.instances:
            rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
            x1, y1, x2, y2 = instance.box
            self.annotations.append(dict(
                id=len(self.annotations) + 1, image_id=image_id, category_id=instance.label + 1,
                bbox=[x1, y1, x2 - x1, y2 - y1], area=int(instance.mask.sum()), iscrowd=0,
                segmentation=dict(size=[height, width], counts=rle['counts'].decode('ascii'))))

    def write(self, path: Path) -> None:
        categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(self.classes)]
        _write_json(path, dict(info=dict(description='mtvision synthetic shapes', version=str(GENERATOR_VERSION)),
                               images=self.images, annotations=self.annotations, categories=categories))


def _write_split(root: Path, options: dict, paths: dict, split: str, count: int, classes: list[str]) -> None:
    split_paths = {task: {key: root / value for key, value in paths[task][split].items()} for task in TASKS}
    classification, detection = split_paths['classification'], split_paths['detection']
    segmentation, depth = split_paths['segmentation'], split_paths['depth']
    coco = _CocoWriter(classes)

    def scenes(stream: str):
        for index in range(count):
            yield f'{index:06d}', synthetic_scene(options['seed'], stream, split, index, options['image_size'],
                                                  options['num_classes'])

    if options['shared_images']:
        normal_dir = root / paths['normals'][split]['normal_dir']
        lines, multilabel_lines = [], []
        for stem, scene in scenes('shared'):
            _write_image(classification['data_root'] / f'{stem}.jpg', scene.image)
            lines.append(f'{stem}.jpg {scene.label}\n')
            multilabel_lines.append(' '.join([f'{stem}.jpg', *map(str, scene.present_classes)]) + '\n')
            coco.add(f'{stem}.jpg', scene)
            _write_png(segmentation['ann_dir'] / f'{stem}.png', scene.semantic)
            _write_png(depth['depth_dir'] / f'{stem}.png', _depth_to_png(scene.depth))
            _write_png(normal_dir / f'{stem}.png', cv2.cvtColor(encode_normals(scene.normals), cv2.COLOR_RGB2BGR))
        _write_text(classification['ann_file'], lines)
        _write_text(root / paths['multilabel'][split]['ann_file'], multilabel_lines)
        coco.write(detection['ann_file'])
        return

    for stem, scene in scenes('classification'):
        _write_image(classification['data_root'] / classes[scene.label] / f'{stem}.jpg', scene.image)
    for stem, scene in scenes('detection'):
        _write_image(detection['img_dir'] / f'{stem}.jpg', scene.image)
        coco.add(f'{stem}.jpg', scene)
    coco.write(detection['ann_file'])
    for stem, scene in scenes('segmentation'):
        _write_image(segmentation['img_dir'] / f'{stem}.jpg', scene.image)
        _write_png(segmentation['ann_dir'] / f'{stem}.png', scene.semantic)
    for stem, scene in scenes('depth'):
        _write_image(depth['img_dir'] / f'{stem}.jpg', scene.image)
        _write_png(depth['depth_dir'] / f'{stem}.png', _depth_to_png(scene.depth))


def generate_synthetic(root: str | os.PathLike, seed: int = 0, num_train: int = 2000, num_val: int = 200,
                       image_size: int = 64, num_classes: int = 6, shared_images: bool = False) -> dict:
    """Write the synthetic dataset into ``root`` (absent or empty) and return its meta dict.

    ``meta.json`` is written last, so a directory without it is incomplete. Prefer :func:`ensure_synthetic`,
    which also never leaves a half-written dataset behind.
    """
    options = _options(seed, num_train, num_val, image_size, num_classes, shared_images)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f'{root} is not empty; use ensure_synthetic(..., force=True) to replace a dataset')
    classes = list(SHAPES[:num_classes])
    paths = _relative_paths(shared_images)
    start = time.perf_counter()
    for split, count in zip(SPLITS, (num_train, num_val)):
        _write_split(root, options, paths, split, count, classes)
    layout = 'one image set carrying all label types' if shared_images else 'one image set per task'
    meta = dict(**options, layout=layout, classes=classes, segmentation_classes=['background', *classes],
                depth_scale=DEPTH_SCALE, ignore_index=IGNORE_INDEX, paths=paths)
    _write_json(root / 'meta.json', meta, indent=2)
    logger.info('wrote %d + %d scenes per task in %.1f s', num_train, num_val, time.perf_counter() - start)
    return meta


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / 'meta.json').read_text())
    except (OSError, ValueError):
        return None


def _matches(meta: dict | None, options: dict) -> bool:
    return meta is not None and all(meta.get(key) == value for key, value in options.items())


def ensure_synthetic(root: str | os.PathLike, seed: int = 0, num_train: int = 2000, num_val: int = 200,
                     image_size: int = 64, num_classes: int = 6, shared_images: bool = False,
                     force: bool = False) -> dict:
    """Return the meta dict of the synthetic dataset at ``root``, generating it first when needed.

    Generates when ``<root>/meta.json`` is missing, records other options (or another generator version), or
    ``force`` is set. The dataset is written into a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a dataset that looks complete. Several processes may call this at once: the
    first to finish wins and the others keep its result. A non-empty ``root`` that holds no synthetic dataset is
    never deleted.
    """
    options = _options(seed, num_train, num_val, image_size, num_classes, shared_images)
    root = Path(root)
    meta = _read_meta(root)
    if not force and _matches(meta, options):
        logger.info('synthetic dataset at %s is up to date', root)
        return meta
    if meta is None and root.exists() and any(root.iterdir()):
        raise FileExistsError(f'{root} is not empty and holds no synthetic dataset (no readable meta.json); '
                              f'remove it or choose another root')
    logger.info('generating synthetic dataset in %s (%s)', root,
                'forced' if force else 'missing' if meta is None else 'options differ')
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-', dir=root.parent))
    try:
        meta = generate_synthetic(staging / 'new', **{key: options[key] for key in options if key != 'version'})
        current = _read_meta(root)
        if not force and _matches(current, options):
            # another process finished the same dataset meanwhile, and may already be reading it
            logger.info('synthetic dataset at %s was written by another process meanwhile; keeping it', root)
            return current
        if root.exists():
            # a non-empty directory cannot be replaced by one rename: move the old one aside first
            os.rename(root, staging / 'old')
        os.rename(staging / 'new', root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info('synthetic dataset ready at %s', root)
    return meta
