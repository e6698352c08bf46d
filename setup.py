"""The model zoo ships inside the package: every built wheel carries ``configs/`` (the metafiles and the configs
they name, ``_base_`` files included) as ``mtvision/.mim/configs``, the layout mmpretrain's setup.py builds
(``add_mim_extension``). A checkout or an editable install reads ``configs/`` where it is, so the repository keeps
its layout (``python tools/train.py configs/...``). Everything else is in pyproject.toml.

pyproject.toml alone cannot do this: ``[tool.setuptools.package-dir]`` can map ``configs/`` to a package, but
``packages.find`` never lists a package that lives outside the package's own folder.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ZOO_SOURCE = Path(__file__).resolve().parent / 'configs'
ZOO_TARGET = Path('mtvision', '.mim', 'configs')  # relative to the build folder; see mtvision.zoo.metafile


class BuildPyWithZoo(build_py):
    """``build_py`` that also copies ``configs/`` into the package (never in editable mode: the package then reads
    the repository's own folder)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / ZOO_TARGET
            shutil.rmtree(target, ignore_errors=True)  # a file removed from configs/ must not linger in a rebuild
            shutil.copytree(ZOO_SOURCE, target, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


setup(cmdclass={'build_py': BuildPyWithZoo})
