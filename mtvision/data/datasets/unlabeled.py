"""Images without labels, for self-supervised tasks: a folder of images, or any labeled dataset's images."""
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from mtvision.data.collate import Sample
from mtvision.data.datasets.imagefolder import IMAGE_EXTENSIONS, list_images, read_image
from mtvision.data.datasets.index import PathArray
from mtvision.data.errors import DataError
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['ImagesOf', 'UnlabeledImageFolder']


@DATASETS.register_module()
class UnlabeledImageFolder(Dataset):
    """Every image below ``data_root`` (recursively, sorted), returned as ``(image, None)``.

    Args:
        data_root: the folder; class sub-folders, if any, are read as plain folders.
        pipeline: transform configs or a built transform.
        extensions: image file extensions, matched case-insensitively.
    """

    def __init__(self, data_root: str | os.PathLike, pipeline: Sequence[dict] | Callable = (),
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.data_root = Path(data_root)
        if not self.data_root.is_dir():
            raise DataError('data_root is not a folder', self.data_root)
        self.samples = PathArray(list_images(self.data_root, extensions))  # shared by workers, not copied
        if not self.samples:
            raise DataError(f'no image with extension in {tuple(extensions)}', self.data_root)
        self.pipeline = build_pipeline(pipeline)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path = self.samples[index]
        return Sample(self.pipeline(read_image(path, index)), None, path)


@DATASETS.register_module()
class ImagesOf(Dataset):
    """The images of a labeled dataset, its labels dropped: any supervised dataset can feed a self-supervised task,
    e.g. ``ImagesOf(dataset=dict(type='CocoDetectionDataset', ...))``.

    Args:
        dataset: the labeled dataset (config or instance).
        pipeline: transforms for the image alone, applied after the dataset's own pipeline (give the dataset none to
            start from the decoded image). Needed for pipelines that do not take labels along, such as
            ``MultiView``; the dataset's own pipeline moves its labels with the image.
    """

    def __init__(self, dataset: dict | Dataset, pipeline: Sequence[dict] | Callable = ()):
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.pipeline = build_pipeline(pipeline)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return Sample(self.pipeline(sample[0]), None, getattr(sample, 'path', None))
