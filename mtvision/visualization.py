"""PNG pictures of what the model predicts and of how training goes, written by the trainer at each evaluation.

Everything is drawn on matplotlib's Agg canvas without pyplot: no display is needed and no figure outlives its
call. Each PNG is written under a temporary name and renamed, so a viewer never reads half a file.
"""
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from mtvision.task_types import task_type_spec

__all__ = ['denormalize', 'draw_classification', 'draw_depth', 'draw_detection', 'draw_multilabel', 'draw_normals',
           'draw_reconstructions', 'draw_segmentation', 'draw_view_retrieval', 'save_expert_usage',
           'save_loss_curves', 'save_prediction_grid']

IGNORE_INDEX = 255  # the segmentation ignore label of docs/ARCHITECTURE.md
PANEL_INCHES = 3.0
DPI = 100
DETECTION_SCORE_THRESHOLD = 0.3
MAX_DRAWN_BOXES = 20
MAX_LEGEND_ENTRIES = 12


def _label_palette(num_colours: int = 255) -> np.ndarray:
    # golden-ratio hue steps keep neighbouring class ids far apart in colour; no entry is dark, so black stays
    # reserved for ignored or invalid pixels
    index = np.arange(num_colours)
    hsv = np.stack([(index * 0.618033988749895) % 1.0, np.full(num_colours, 0.75), 1.0 - 0.3 * (index // 12 % 2)],
                   axis=1)
    return hsv_to_rgb(hsv)


_PALETTE = _label_palette()


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the input normalisation ``(x - mean) / std``: uint8 RGB images [B, H, W, 3] from float [B, 3, H, W].

    ``mean`` and ``std`` may be given on the 0..1 scale (torchvision, e.g. ``(0.485, 0.456, 0.406)``) or on the
    0..255 scale (mmpretrain, e.g. ``(123.675, 116.28, 103.53)``): when any value of either exceeds 1, both are
    read as 0..255. Values outside the displayable range are clipped.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f'images must be [B, 3, H, W], got {tuple(images.shape)}')
    mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    if mean_t.numel() != 3 or std_t.numel() != 3:
        raise ValueError(f'mean and std need 3 values (RGB), got mean={tuple(mean_t.tolist())}, '
                         f'std={tuple(std_t.tolist())}')
    if max(mean_t.max(), std_t.max()) > 1:
        mean_t, std_t = mean_t / 255, std_t / 255
    pixels = images.detach().cpu().double() * std_t[:, None, None] + mean_t[:, None, None]
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_prediction_grid(path: str | Path, task_type: str, images: Tensor, targets, predictions,
                         mean: Sequence[float], std: Sequence[float], class_names: Sequence[str] | None = None,
                         max_samples: int = 4) -> Path:
    """Draw up to ``max_samples`` samples of a batch, one row each, ground truth beside prediction; return the path.

    The task type's spec (:func:`~mtvision.task_types.task_type_spec`) says how many panels a row has and draws
    them; the built-in types draw with the ``draw_*`` functions of this module.

    Args:
        path: the PNG to write; missing parent directories are created.
        task_type: a registered task type (``mtvision.registry.TASK_TYPES``), whose spec draws the rows.
        images: the normalised network inputs [B, 3, H, W].
        targets: the batch targets and ``predictions`` the head predictions, in the formats of
            docs/ARCHITECTURE.md.
        mean, std: the normalisation of ``images``, on the 0..1 or the 0..255 scale (see :func:`denormalize`).
        class_names: names of the contiguous class ids; ids are shown when None.
        max_samples: the number of rows at most.
    """
    spec = task_type_spec(task_type, 'task_type')
    pictures = denormalize(images, mean, std)
    num_rows = min(spec.grid_rows(len(pictures)), max_samples)
    if num_rows < 1:
        raise ValueError(f'nothing to draw: {len(pictures)} images and max_samples={max_samples}')
    figure = _new_figure(spec.grid_panels * PANEL_INCHES, num_rows * PANEL_INCHES)
    axes = figure.subplots(num_rows, spec.grid_panels, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    spec.draw_prediction_grid(figure, axes, pictures, targets, predictions, _Names(class_names), mean, std)
    return _save_atomically(figure, path)


def save_loss_curves(path: str | Path, records: Sequence[dict]) -> Path:
    """Plot the training scalars against ``'step'`` and return the path of the PNG.

    Every key starting with ``'loss'`` goes on a log-scaled panel, each as a faint raw line and a smoothed line;
    ``'lr'`` and ``'lr/...'`` keys, when present, go on a small panel below. Records may miss keys; values that
    are not finite (and, for losses, not positive, which a log scale cannot show) are left out.

    Args:
        path: the PNG to write; missing parent directories are created.
        records: the lines of the trainer's scalars file, e.g. ``{'step': 10, 'loss/total': 2.3, 'lr': 1e-3}``.
    """
    for index, record in enumerate(records):
        if 'step' not in record:
            raise ValueError(f"scalar record {index} has no 'step': {record}")
    loss_keys = sorted({key for record in records for key in record if key.startswith('loss')})
    lr_keys = sorted({key for record in records for key in record if key == 'lr' or key.startswith('lr/')})

    figure = _new_figure(8.0, 5.0)
    if lr_keys:
        loss_ax, lr_ax = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        loss_ax, lr_ax = figure.subplots(1, 1), None
    plotted = 0
    for colour_index, key in enumerate(loss_keys):
        steps, values = _series(records, key, positive=True)
        if len(values) == 0:
            continue
        colour = f'C{colour_index % 10}'
        loss_ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        loss_ax.plot(steps, _smooth_positive(values), color=colour, linewidth=1.5, label=key)
        plotted += 1
    if plotted:
        loss_ax.set_yscale('log')
        loss_ax.legend(fontsize=8)
    else:
        loss_ax.text(0.5, 0.5, 'no loss values yet', transform=loss_ax.transAxes, ha='center', va='center')
    loss_ax.set_ylabel('loss')
    loss_ax.grid(True, which='both', alpha=0.3)
    if lr_ax is not None:
        for key in lr_keys:
            lr_ax.plot(*_series(records, key, positive=False), linewidth=1.2, label=key)
        lr_ax.set_ylabel('lr')
        lr_ax.ticklabel_format(axis='y', style='sci', scilimits=(0, 0))
        lr_ax.grid(True, alpha=0.3)
        if len(lr_keys) > 1:
            lr_ax.legend(fontsize=7)
    (loss_ax if lr_ax is None else lr_ax).set_xlabel('step')
    return _save_atomically(figure, path)


def save_expert_usage(path: str | Path, usage: dict[str, tuple[Sequence[str], Tensor]]) -> Path:
    """Heatmaps of how each task routes its tokens: one panel per MoE layer, a row per task, a column per expert,
    each cell the share of the task's token assignments that went to the expert (rows sum to 1; grey rows: the
    task sent no token through the layer). White is the uniform share 1/E, red more (a collapsed router is one red
    column), blue less (an unused expert); experts specialised by task show as rows that differ.

    Args:
        path: the PNG to write; missing parent directories are created.
        usage: ``{layer name: (task names, counts [num_tasks, E])}``, e.g. from ``MultiTaskModel.expert_usage()``.
    """
    if not usage:
        raise ValueError('no MoE layer to draw')
    columns = min(len(usage), 3)
    rows = math.ceil(len(usage) / columns)
    first_tasks, first_counts = next(iter(usage.values()))
    cell = 0.45
    figure = _new_figure(columns * (1.5 + cell * first_counts.shape[1]), rows * (1.0 + cell * len(first_tasks)))
    axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in axes[len(usage):]:
        ax.set_axis_off()
    for ax, (layer, (tasks, counts)) in zip(axes, usage.items()):
        counts = _as_numpy(counts).astype(np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
        # white = the uniform share 1/E; red up to 1 (one expert takes everything: collapse), blue down to 0
        uniform = 1.0 / counts.shape[1]
        image = ax.imshow(np.ma.masked_invalid(shares), aspect='auto',
                          norm=TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(1.0, 2 * uniform)),
                          cmap=matplotlib.colormaps['RdBu_r'].with_extremes(bad='0.7'))
        for (row, col), share in np.ndenumerate(shares):
            if np.isfinite(share):
                dark = share > 0.5 * (1 + uniform) or share < 0.3 * uniform
                ax.text(col, row, f'{share:.2f}'.lstrip('0'), ha='center', va='center', fontsize=6,
                        color='white' if dark else 'black')
        ax.set_yticks(range(len(tasks)), labels=list(tasks), fontsize=7)
        ax.set_xticks(range(counts.shape[1]), labels=[str(e) for e in range(counts.shape[1])], fontsize=6)
        ax.set_xlabel('expert', fontsize=7)
        ax.set_title(layer, fontsize=8)
    figure.colorbar(image, ax=list(axes[:len(usage)]), shrink=0.8, label='share of the task\'s tokens')
    return _save_atomically(figure, path)


class _Names:
    """Class names for display, falling back to the id when a name is unknown."""

    def __init__(self, class_names: Sequence[str] | None):
        self.class_names = list(class_names) if class_names is not None else []

    def __call__(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout='constrained')
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'.{path.name}.tmp')
    try:
        figure.savefig(temporary, format='png', dpi=DPI)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


def _colour_labels(labels: np.ndarray) -> np.ndarray:
    colours = _PALETTE[labels.astype(np.int64) % len(_PALETTE)]
    colours[labels == IGNORE_INDEX] = 0.0
    return colours


def draw_classification(axes: Sequence[Axes], picture: np.ndarray, target, prediction: Tensor,
                        names: _Names) -> None:
    """The image titled with the true class and the predicted class and its score."""
    scores = _as_numpy(prediction).reshape(-1)
    true_label, predicted = int(_as_numpy(target)), int(scores.argmax())
    axes[0].imshow(picture)
    axes[0].set_title(f'true: {names(true_label)}\npred: {names(predicted)} ({scores[predicted]:.2f})',
                      fontsize=9, color='tab:green' if predicted == true_label else 'tab:red')


def _draw_boxes(ax: Axes, boxes: np.ndarray, labels: np.ndarray, names: _Names,
                scores: np.ndarray | None = None) -> None:
    for index, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels.tolist())):
        colour = _PALETTE[label % len(_PALETTE)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
        caption = names(label) if scores is None else f'{names(label)} {scores[index]:.2f}'
        ax.text(x1, y1, caption, fontsize=6, color='black', va='bottom',
                bbox=dict(facecolor=colour, edgecolor='none', pad=1, alpha=0.8))


def draw_detection(axes: Sequence[Axes], picture: np.ndarray, target: dict, prediction: dict,
                   names: _Names) -> None:
    """The image with the true boxes and the image with the predicted boxes (score at least
    ``DETECTION_SCORE_THRESHOLD``, at most ``MAX_DRAWN_BOXES``)."""
    true_boxes = _as_numpy(target['boxes']).reshape(-1, 4)
    scores = _as_numpy(prediction['scores']).reshape(-1)
    order = np.argsort(-scores, kind='stable')
    shown = order[scores[order] >= DETECTION_SCORE_THRESHOLD][:MAX_DRAWN_BOXES]
    for ax in axes:
        ax.imshow(picture)
    _draw_boxes(axes[0], true_boxes, _as_numpy(target['labels']).reshape(-1), names)
    _draw_boxes(axes[1], _as_numpy(prediction['boxes']).reshape(-1, 4)[shown],
                _as_numpy(prediction['labels']).reshape(-1)[shown], names, scores[shown])
    axes[0].set_title(f'ground truth ({len(true_boxes)} boxes)', fontsize=9)
    top_score = f' (top {scores.max():.2f})' if len(scores) else ''
    axes[1].set_title(f'prediction: {len(shown)} of {len(scores)} scored >= {DETECTION_SCORE_THRESHOLD}{top_score}',
                      fontsize=8)


def draw_segmentation(axes: Sequence[Axes], picture: np.ndarray, target: Tensor, prediction: Tensor,
                      names: _Names) -> None:
    """The image and the true and predicted label maps colour-coded, ignored pixels black."""
    true_labels, predicted = _as_numpy(target), _as_numpy(prediction)
    axes[0].imshow(picture)
    axes[1].imshow(_colour_labels(true_labels), interpolation='nearest')
    axes[2].imshow(_colour_labels(predicted), interpolation='nearest')
    for ax, title in zip(axes, ('image', 'ground truth', 'prediction')):
        ax.set_title(title, fontsize=9)
    present = np.union1d(np.unique(true_labels), np.unique(predicted))
    present = present[present != IGNORE_INDEX][:MAX_LEGEND_ENTRIES].tolist()
    if present:
        handles = [Patch(color=_PALETTE[label % len(_PALETTE)], label=names(label)) for label in present]
        axes[2].legend(handles=handles, fontsize=6, loc='upper right', framealpha=0.6)


def draw_reconstructions(axes: np.ndarray, pictures: np.ndarray, predictions: dict, mean: Sequence[float],
                         std: Sequence[float]) -> None:
    """Per row of ``axes``: the image, the masked image (masked patches grey) and the reconstruction with the
    visible patches pasted back, as MAE's figures show it."""
    reconstructions = denormalize(predictions['images'], mean, std)
    masks = _as_numpy(predictions['mask'][:, 0]) > 0.5
    for row_axes, picture, reconstruction, masked in zip(axes, pictures, reconstructions, masks):
        hidden = picture.copy()
        hidden[masked] = 128
        pasted = np.where(masked[..., None], reconstruction, picture)
        for ax, image, title in zip(row_axes, (picture, hidden, pasted),
                                    ('image', 'masked', 'reconstruction + visible')):
            ax.imshow(image)
            ax.set_title(title, fontsize=9)


def draw_view_retrieval(axes: np.ndarray, pictures: np.ndarray, embeddings: Tensor) -> None:
    """Per row of ``axes``: the two views of an image (``pictures`` view-major, the first half view 1) and the
    second view the first one's embedding is nearest to in the batch, with its cosine (green when it is the right
    one)."""
    pictures = pictures.reshape(2, -1, *pictures.shape[1:])
    similarity = (lambda z: z[:len(z) // 2] @ z[len(z) // 2:].T)(_as_numpy(embeddings).astype(np.float64))
    for row, row_axes in enumerate(axes):
        nearest = int(similarity[row].argmax())
        panels = ((pictures[0, row], 'view 1', 'black'), (pictures[1, row], 'view 2', 'black'),
                  (pictures[1, nearest], f'nearest view 2 (cos {similarity[row, nearest]:.2f})',
                   'tab:green' if nearest == row else 'tab:red'))
        for ax, (image, title, colour) in zip(row_axes, panels):
            ax.imshow(image)
            ax.set_title(title, fontsize=9, color=colour)


def draw_depth(figure: Figure, axes: Sequence[Axes], picture: np.ndarray, target: Tensor,
               prediction: Tensor) -> None:
    """The image and the true and predicted depth colour-mapped over the range of the valid true depth, invalid
    pixels black."""
    true_depth = _as_numpy(target).squeeze(0).astype(np.float64)
    predicted = _as_numpy(prediction).squeeze(0).astype(np.float64)
    valid = true_depth > 0
    reference = true_depth[valid] if valid.any() else predicted[np.isfinite(predicted)]
    low, high = (float(reference.min()), float(reference.max())) if reference.size else (0.0, 1.0)
    colour_map = matplotlib.colormaps['viridis'].with_extremes(bad='black')
    axes[0].imshow(picture)
    axes[1].imshow(np.ma.masked_where(~valid, true_depth), cmap=colour_map, vmin=low, vmax=high)
    image = axes[2].imshow(predicted, cmap=colour_map, vmin=low, vmax=high)
    figure.colorbar(image, ax=axes[2], fraction=0.046, pad=0.02, label='m')
    for ax, title in zip(axes, ('image', f'ground truth ({valid.mean():.0%} valid)', 'prediction')):
        ax.set_title(title, fontsize=9)


def draw_normals(axes: Sequence[Axes], picture: np.ndarray, target: Tensor, prediction: Tensor) -> None:
    """The image and the true and predicted unit normals as colours (x, y, z in -1..1 to R, G, B in 0..1, as
    NYUv2's normal maps are shown), invalid (zero) true normals black."""
    true_normals = _as_numpy(target).astype(np.float64).transpose(1, 2, 0)
    predicted = _as_numpy(prediction).astype(np.float64).transpose(1, 2, 0)
    valid = np.abs(true_normals).sum(axis=-1) > 0
    axes[0].imshow(picture)
    axes[1].imshow(np.where(valid[..., None], (true_normals + 1) / 2, 0.0).clip(0, 1))
    axes[2].imshow(((predicted + 1) / 2).clip(0, 1))
    for ax, title in zip(axes, ('image', f'ground truth ({valid.mean():.0%} valid)', 'prediction')):
        ax.set_title(title, fontsize=9)


def draw_multilabel(axes: Sequence[Axes], picture: np.ndarray, target: Tensor, prediction: Tensor, names: _Names,
                    threshold: float = 0.5) -> None:
    """The image titled with its present classes and the classes predicted at least ``threshold`` (at most
    ``MAX_LEGEND_ENTRIES`` each), green when the two sets agree."""
    present = np.flatnonzero(_as_numpy(target).reshape(-1) == 1)
    predicted = np.flatnonzero(_as_numpy(prediction).reshape(-1) >= threshold)

    def listed(labels: np.ndarray) -> str:
        more = f' +{len(labels) - MAX_LEGEND_ENTRIES}' if len(labels) > MAX_LEGEND_ENTRIES else ''
        return (', '.join(names(int(label)) for label in labels[:MAX_LEGEND_ENTRIES]) or '-') + more

    axes[0].imshow(picture)
    axes[0].set_title(f'true: {listed(present)}\npred: {listed(predicted)}', fontsize=8, wrap=True,
                      color='tab:green' if np.array_equal(present, predicted) else 'tab:red')


def _series(records: Sequence[dict], key: str, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([record['step'] for record in records if key in record], dtype=np.float64)
    values = np.array([record[key] for record in records if key in record], dtype=np.float64)
    keep = np.isfinite(values)
    if positive:
        keep &= values > 0
    # a resumed run repeats steps after its checkpoint; sorting keeps the line from doubling back
    order = np.argsort(steps[keep], kind='stable')
    return steps[keep][order], values[keep][order]


def _smooth_positive(values: np.ndarray) -> np.ndarray:
    # bias-corrected exponential moving average of log values (geometric, matching the log axis, and robust to
    # spikes); the window grows with the run so the trend reads alike at step 100 and at step 100k
    weight = 1.0 - 1.0 / max(1.0, len(values) / 50)
    running, smoothed = 0.0, np.empty_like(values)
    for index, log_value in enumerate(np.log(values)):
        running = weight * running + (1.0 - weight) * log_value
        smoothed[index] = math.exp(running / (1.0 - weight ** (index + 1)))
    return smoothed
