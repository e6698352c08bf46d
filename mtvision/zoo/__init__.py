"""Model zoo groundwork: verified, cached downloads and weight files read without running their pickles."""
from mtvision.zoo.fetch import ChecksumError, DownloadError, download, get_cache_dir
from mtvision.zoo.weights import UnsafeCheckpointError, load_weights_file

__all__ = ['ChecksumError', 'DownloadError', 'UnsafeCheckpointError', 'download', 'get_cache_dir',
           'load_weights_file']
