"""The zoo ships with the package: a wheel built from the repository, installed into a fresh virtual environment,
lists and builds the zoo's models from a folder outside the repository."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from mtvision.zoo.metafile import load_zoo

ROOT = Path(__file__).resolve().parents[2]
# what a wheel is built from; the rest of the checkout (tests, tools, data, work dirs) stays out of the build
BUILD_INPUTS = ('pyproject.toml', 'setup.py', 'MANIFEST.in', 'README.md', 'LICENSE', 'mtvision', 'configs')
SMALL_MODELS = '*_synthetic'  # the quick-start models, built in the test; the others only have their configs read

CHECK_INSTALLED = """
import json, sys
import mtvision
from mtvision.config import load_config
from mtvision.zoo.metafile import load_zoo
zoo = load_zoo()
for entry in zoo.models.values():
    load_config(str(entry.config_path))  # every named config and its _base_ files are there
built = {name: sum(p.numel() for p in mtvision.get_model(name, pretrained=False).parameters())
         for name in mtvision.list_models(sys.argv[1])}
json.dump({'package': mtvision.__file__, 'root': str(zoo.root), 'models': mtvision.list_models(), 'built': built},
          sys.stdout)
"""


def test_installed_wheel_carries_the_zoo(tmp_path):
    source = tmp_path / 'source'
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    run = dict(check=True, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k not in ('PYTHONPATH', 'MTVISION_ZOO')})
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(source), '--no-deps', '--no-build-isolation',
                    '--no-index', '-w', str(tmp_path / 'dist'), '-q'], **run)
    (wheel,) = (tmp_path / 'dist').glob('mtvision-*.whl')

    # every file of configs/ is in the wheel, under the package
    expected = {path.relative_to(source / 'configs').as_posix() for path in (source / 'configs').rglob('*')
                if path.is_file()}
    prefix = 'mtvision/.mim/configs/'
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name[len(prefix):] for name in archive.namelist() if name.startswith(prefix)}
    assert shipped == expected and 'quickstart/metafile.yml' in shipped

    # a fresh environment (torch and the other dependencies from this one) with the wheel installed, run elsewhere
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], **run)
    python = venv / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index',
                    str(wheel), '-q'], **run)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    result = subprocess.run([str(python), '-c', CHECK_INSTALLED, SMALL_MODELS], cwd=elsewhere, **run)
    installed = json.loads(result.stdout)

    package = Path(installed['package']).resolve()
    assert venv.resolve() in package.parents and ROOT not in package.parents  # the wheel's copy, not the checkout
    assert Path(installed['root']) == package.parent / '.mim'
    zoo = load_zoo(ROOT, user_zoos=[])  # the checkout's zoo, read in place
    assert installed['models'] == sorted(zoo.models)
    assert installed['built'] and installed['built'] == {name: zoo.models[name].parameters
                                                         for name in installed['built']}
