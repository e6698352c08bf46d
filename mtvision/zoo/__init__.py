"""The model zoo: named entries from the metafiles, verified downloads, one resolver for every model or weights
argument, and converters from timm weights."""
from mtvision.fileio import UnsafeCheckpointError, load_weights_file
from mtvision.zoo.api import get_model, list_models, load_model
from mtvision.zoo.convert import convert_timm_state_dict
from mtvision.zoo.fetch import ChecksumError, DownloadError, download, get_cache_dir
from mtvision.zoo.metafile import MetafileError, ModelEntry, load_zoo
from mtvision.zoo.resolve import Resolved, load_pretrained, resolve, resume_checkpoint, training_checkpoint

__all__ = ['ChecksumError', 'DownloadError', 'MetafileError', 'ModelEntry', 'Resolved', 'UnsafeCheckpointError',
           'convert_timm_state_dict', 'download', 'get_cache_dir', 'get_model', 'list_models', 'load_model',
           'load_pretrained', 'load_weights_file', 'load_zoo', 'resolve', 'resume_checkpoint', 'training_checkpoint']
