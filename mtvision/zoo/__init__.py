"""The model zoo: named entries from the metafiles, verified downloads, weights files read without running their
pickles, and converters from timm weights."""
from mtvision.zoo.api import get_model, list_models
from mtvision.zoo.convert import convert_timm_state_dict
from mtvision.zoo.fetch import ChecksumError, DownloadError, download, get_cache_dir
from mtvision.zoo.metafile import MetafileError, ModelEntry, load_zoo
from mtvision.zoo.weights import UnsafeCheckpointError, load_weights_file

__all__ = ['ChecksumError', 'DownloadError', 'MetafileError', 'ModelEntry', 'UnsafeCheckpointError',
           'convert_timm_state_dict', 'download', 'get_cache_dir', 'get_model', 'list_models', 'load_weights_file',
           'load_zoo']
