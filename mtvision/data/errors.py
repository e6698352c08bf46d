"""The error raised for bad input data, and how loaders report the problems their checks find."""
import os
from collections.abc import Iterable

__all__ = ['DataError', 'DataProblems', 'ERROR_MODES', 'LEVELS']

LEVELS = ('error', 'warning')
ERROR_MODES = ('raise', 'collect')


class DataError(ValueError):
    """Bad input data: a missing or corrupt file, or an annotation that cannot be right.

    The message names the offending file and, where one applies, the index of the sample (or annotation, or line)
    so that the culprit can be found in a dataset of millions of files.

    Args:
        problem: what is wrong, e.g. ``'category_id 7 is not in categories'``.
        path: the file (or folder) holding the bad input.
        index: the sample, annotation or line index the problem belongs to.
        level: ``'error'``: the input cannot be used; ``'warning'``: it loads but is probably wrong (e.g. a box
            reaching well past its image, which loaders clip). Checks never raise warnings; an audit reports them.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None, index: int | None = None,
                 level: str = 'error'):
        if level not in LEVELS:
            raise ValueError(f'level must be one of {LEVELS}, got {level!r}')
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.index = index
        self.level = level
        where = [] if self.path is None else [repr(self.path)]
        if index is not None:
            where.append(f'index {index}')
        super().__init__(f'{", ".join(where)}: {problem}' if where else problem)

    def __reduce__(self):
        # the default reduction would call __init__ with the formatted message as `problem` only
        return type(self), (self.problem, self.path, self.index, self.level)


class DataProblems:
    """Where a loader's checks send what they find, so that one implementation of each check serves both modes.

    With ``errors='raise'`` (training) the first error-level problem is raised; with ``errors='collect'`` (an
    audit) every problem is kept in :attr:`found` and the caller leaves the bad entry out. Warnings are kept in
    both modes and never raised.

    Args:
        errors: ``'raise'`` or ``'collect'``.
    """

    def __init__(self, errors: str = 'raise'):
        if errors not in ERROR_MODES:
            raise ValueError(f'errors must be one of {ERROR_MODES}, got {errors!r}')
        self.collect = errors == 'collect'
        self.found: list[DataError] = []

    def report(self, problems: DataError | Iterable[DataError]) -> bool:
        """Raise or keep ``problems`` (one, or an iterable that may be a lazy generator of checks).

        Returns whether any of them is an error, i.e. whether the entry they belong to must be left out.
        """
        bad = False
        for problem in [problems] if isinstance(problems, DataError) else problems:
            if problem.level == 'error':
                if not self.collect:
                    raise problem
                bad = True
            self.found.append(problem)
        return bad
