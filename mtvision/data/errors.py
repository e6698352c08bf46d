"""The error raised for bad input data."""
import os


class DataError(ValueError):
    """Bad input data: a missing or corrupt file, or an annotation that cannot be right.

    The message names the offending file and, where one applies, the index of the sample (or annotation, or line)
    so that the culprit can be found in a dataset of millions of files.

    Args:
        problem: what is wrong, e.g. ``'category_id 7 is not in categories'``.
        path: the file (or folder) holding the bad input.
        index: the sample, annotation or line index the problem belongs to.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None, index: int | None = None):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.index = index
        where = [] if self.path is None else [repr(self.path)]
        if index is not None:
            where.append(f'index {index}')
        super().__init__(f'{", ".join(where)}: {problem}' if where else problem)

    def __reduce__(self):
        # the default reduction would call __init__ with the formatted message as `problem` only
        return type(self), (self.problem, self.path, self.index)
