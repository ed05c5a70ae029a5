"""Error types shared across tcpmesh. Each carries what failed, on which object, and how to fix it.

Module-specific errors subclass these; the CLI prints ``str(error)`` and exits non-zero without a
traceback for any ``TcpmeshError``.
"""


class TcpmeshError(Exception):
    """Base class for errors an operator can act on."""


class ConfigError(TcpmeshError):
    """A configuration or input file is invalid. The message names the field, the value and the fix."""

    def __init__(self, field: str, value: object, problem: str, fix: str = "") -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        text = f"{field}: {problem} (got {value!r})"
        if fix:
            text += f"; {fix}"
        super().__init__(text)


class ConfigErrors(ConfigError):
    """Every problem of one config file at once, as a validator reports them: ``errors`` in the order found. The
    first is also this error's own field, value, problem and fix, for code that reads one."""

    def __init__(self, errors: list[ConfigError], where: str = "") -> None:
        first = errors[0]
        self.errors = list(errors)
        self.field, self.value, self.problem, self.fix = first.field, first.value, first.problem, first.fix
        lines = "\n".join(f"  {error}" for error in self.errors)
        Exception.__init__(self, f"{where + ': ' if where else ''}{len(self.errors)} problems:\n{lines}")


def refused(errors: list[ConfigError], where: str = "") -> ConfigError:
    """The one error to raise for ``errors`` (not empty): itself when alone, else ConfigErrors naming them all."""
    return errors[0] if len(errors) == 1 else ConfigErrors(errors, where)


def problems_of(error: ConfigError) -> list[ConfigError]:
    """The problems ``error`` stands for: its ``errors`` (ConfigErrors), else itself."""
    return list(error.errors) if isinstance(error, ConfigErrors) else [error]


def invalid_yaml(path: object, text: str, exc: Exception) -> ConfigError:
    """A YAML parse error of the file ``path`` as a ConfigError: ``PATH:LINE: not valid YAML: PROBLEM (got
    'the line')`` and the usual fix (PyYAML's own text says ``<unicode string>`` and points with a caret)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return ConfigError(str(path), "<file>", f"not valid YAML: {problem}")
    lines = text.splitlines()
    line = lines[mark.line].strip() if mark.line < len(lines) else ""
    return ConfigError(f"{path}:{mark.line + 1}", line, f"not valid YAML: {problem} (column {mark.column + 1})",
                       "check the indentation (the same number of spaces for keys of one mapping), a space after "
                       "each ':', and quotes around values with ': ', '#', '[' or '{'")


class EnvironmentProblem(TcpmeshError):
    """The host lacks something tcpmesh needs (root, cgroup v2, bcc, a kernel feature)."""


class KernelError(TcpmeshError):
    """A kernel call failed: names the operation, the object and the errno."""

    def __init__(self, operation: str, target: str, errno_: int | None = None, detail: str = "") -> None:
        self.operation = operation
        self.target = target
        self.errno = errno_
        text = f"{operation} on {target} failed"
        if errno_ is not None:
            import os

            text += f": [Errno {errno_}] {os.strerror(errno_)}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)
