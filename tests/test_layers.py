"""Imports go one way (docs/ARCHITECTURE.md): fileio <- checkpoint <- models / zoo <- engine. A lower layer that
imports a higher one, even inside a function, is reported with its file and line."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'mtvision'

# what each layer must not import
FORBIDDEN = {
    'fileio.py': ('mtvision',),
    'checkpoint.py': ('mtvision.engine', 'mtvision.zoo', 'mtvision.probe', 'mtvision.models'),
    'models': ('mtvision.engine', 'mtvision.zoo', 'mtvision.probe'),
    'zoo': ('mtvision.engine', 'mtvision.probe'),
    'merging.py': ('mtvision.engine', 'mtvision.probe'),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f'{node.module}.{alias.name}') for alias in node.names]
    return found


@pytest.mark.parametrize('layer', sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    files = [PACKAGE / layer] if layer.endswith('.py') else sorted((PACKAGE / layer).rglob('*.py'))
    assert files and all(path.is_file() for path in files)
    wrong = [f'{path.relative_to(PACKAGE.parent)}:{line} imports {module}'
             for path in files for line, module in imported_modules(path)
             if any(module == prefix or module.startswith(prefix + '.') for prefix in FORBIDDEN[layer])]
    assert not wrong, '\n'.join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / 'lazy.py'
    module.write_text('def f():\n    from mtvision.engine import Trainer\n    import mtvision.zoo\n')
    assert imported_modules(module) == [(2, 'mtvision.engine.Trainer'), (3, 'mtvision.zoo')]
