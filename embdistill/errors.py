"""The one exception type for problems with the user's input.

Stage scripts run under :func:`embdistill.cli.run_main`, which prints a ``UserError`` as a
single line (``error: ...``) and exits with status 2: no traceback from deep inside.
"""

from safetensors import SafetensorError

# What loading a model folder raises for a missing, truncated or damaged file: safetensors'
# error (a truncated model.safetensors) is neither an OSError nor a ValueError.
MODEL_LOAD_ERRORS = (OSError, ValueError, SafetensorError)


class UserError(Exception):
    """Bad input (task, file, model, artefact, option): reported as one line, exit status 2."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (its first, at most ``limit`` characters), to quote
    in a UserError or a log line."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:limit]
