"""Every script in benchmarks/ and tools/ starts: an import error or a broken command line cannot land.

Each script runs with ``--help`` (argparse exits before any heavy work) or, where it has one, its tiny ``--quick``
mode, all in one child process (torch is imported once, and no script touches the test process's logging, threads
or ``sys.path``). ``--help`` alone would miss the imports a script makes inside ``main()`` after parsing its
arguments, so every import statement of every script, wherever it is, is also resolved: the module imported and
each imported name looked up in it. An import inside ``try`` that handles ``ImportError`` is optional by design
and is not checked.

Run as a program, this file is that child: ``python tests/test_scripts.py RESULTS.json SCRIPT[::ARG...] ...``.
"""
import ast
import importlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the arguments each script runs with: its smoke mode where it has a fast one, else --help
QUICK_ARGS = {'benchmarks/moe.py': ['--quick'], 'benchmarks/shared_forward.py': ['--quick']}
SCRIPTS = sorted(str(path.relative_to(ROOT)) for pattern in ('benchmarks/*.py', 'tools/*.py', 'tools/*/*.py')
                 for path in ROOT.glob(pattern))
SHELL_SCRIPTS = sorted(str(path.relative_to(ROOT)) for pattern in ('benchmarks/*.sh', 'tools/*.sh')
                       for path in ROOT.glob(pattern))


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of the import statements inside a ``try`` whose handlers catch ImportError."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                handler.type is not None and {'ImportError', 'ModuleNotFoundError'} & {
                    name.id for name in ast.walk(handler.type) if isinstance(name, ast.Name)}
                for handler in node.handlers):
            optional.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return optional


def unresolved_imports(path: Path) -> list[str]:
    """The import statements of ``path`` (at any depth) that fail, as 'line N: statement: error'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    optional = _optional_imports(tree)
    problems = []
    for node in ast.walk(tree):
        if id(node) in optional or not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, 'level', 0):
            continue
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != '*' and not hasattr(module, alias.name):
                    importlib.import_module(f'{node.module}.{alias.name}')  # a submodule not imported yet
        except Exception as error:  # any failure of an import is the finding
            problems.append(f'line {node.lineno}: {ast.unparse(node)}: {type(error).__name__}: {error}')
    return problems


def has_main_guard(path: Path) -> bool:
    return "__name__ == '__main__'" in path.read_text().replace('"', "'")


def run_script(path: Path, args: list[str]) -> dict:
    """Run ``path`` as ``__main__`` with ``args``: its exit code (a traceback when it raised) and its output."""
    saved_argv, saved_path = sys.argv, sys.path[:]
    sys.argv, sys.path[0:0] = [str(path), *args], [str(path.parent)]  # as `python path args` would
    output = io.StringIO()
    try:
        with redirect_stdout(output), redirect_stderr(output):
            runpy.run_path(str(path), run_name='__main__')
        code = 0
    except SystemExit as exit_:
        code = 0 if exit_.code is None else exit_.code
    except BaseException:  # reported to the test, which names the script
        code = traceback.format_exc()
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return dict(args=args, code=code, output=output.getvalue())


def check_scripts(specs: list[str]) -> dict[str, dict]:
    """``SCRIPT[::ARG...]`` each: its unresolved imports and how its run went."""
    results = {}
    for spec in specs:
        script, *args = spec.split('::')
        path = Path(script)
        results[script] = dict(run_script(path, args), imports=unresolved_imports(path), main=has_main_guard(path))
    return results


def run_checker(scripts: list[str], out: Path) -> dict[str, dict]:
    specs = ['::'.join([script, *QUICK_ARGS.get(script, ['--help'])]) for script in scripts]
    child = subprocess.run([sys.executable, __file__, str(out), *specs], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, 'TQDM_DISABLE': '1'}, timeout=300)
    assert child.returncode == 0, f'the script checker itself failed:\n{child.stdout}\n{child.stderr}'
    return json.loads(out.read_text())


def problems_of(result: dict) -> list[str]:
    problems = [f'unresolved import, {problem}' for problem in result['imports']]
    if result['code'] != 0:
        problems.append(f'`{" ".join(result["args"])}` exited with {result["code"]}\n{result["output"][-3000:]}')
    elif result['main'] and result['args'] == ['--help'] and 'usage:' not in result['output']:
        problems.append(f'`--help` printed no usage:\n{result["output"][-3000:]}')
    return problems


# a script whose import inside main() fails only after its arguments parsed: --help alone passes it
LAZY_BROKEN = '''
import argparse
def main():
    parser = argparse.ArgumentParser()
    parser.parse_args()
    from mtvision.registry import NO_SUCH_REGISTRY
if __name__ == '__main__':
    main()
'''
# a script that fails on import, and one that guards an optional dependency correctly
EAGER_BROKEN = 'import argparse\nimport mtvision.no_such_module\nargparse.ArgumentParser().parse_args()\n'
OPTIONAL_IMPORT = '''
import argparse
try:
    import no_such_package
except ImportError:
    no_such_package = None
if __name__ == '__main__':
    argparse.ArgumentParser().parse_args()
'''


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp('scripts')
    planted = {'lazy_broken.py': LAZY_BROKEN, 'eager_broken.py': EAGER_BROKEN, 'optional_import.py': OPTIONAL_IMPORT}
    for name, text in planted.items():
        (folder / name).write_text(text)
    return run_checker(SCRIPTS + [str(folder / name) for name in planted], folder / 'results.json')


def test_the_scripts_are_found():
    assert {'benchmarks/moe.py', 'benchmarks/train_step.py', 'tools/train.py', 'tools/test.py',
            'tools/model_converters/timm_to_mtvision.py'} <= set(SCRIPTS)


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_imports_and_runs_its_quick_mode(results, script):
    problems = problems_of(results[script])
    assert not problems, f'{script}:\n' + '\n'.join(problems)


def test_the_checker_catches_what_help_alone_misses(results):
    lazy, eager, optional = (next(result for script, result in results.items() if script.endswith(f'/{name}'))
                             for name in ('lazy_broken.py', 'eager_broken.py', 'optional_import.py'))
    assert lazy['code'] == 0 and 'usage:' in lazy['output']  # its --help passes...
    assert problems_of(lazy) == [  # ...but the import inside main() is caught, with its line
        "unresolved import, line 6: from mtvision.registry import NO_SUCH_REGISTRY: ModuleNotFoundError: No module "
        "named 'mtvision.registry.NO_SUCH_REGISTRY'; 'mtvision.registry' is not a package"]
    assert 'ModuleNotFoundError' in eager['code'] and len(problems_of(eager)) == 2
    assert problems_of(optional) == []


@pytest.mark.parametrize('script', SHELL_SCRIPTS)
def test_shell_script_parses(script):
    check = subprocess.run(['bash', '-n', script], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, f'{script}: {check.stderr}'


if __name__ == '__main__':
    Path(sys.argv[1]).write_text(json.dumps(check_scripts(sys.argv[2:])))
