"""Every error moegraph raises on purpose derives from MoeGraphError, so callers (and the CLI)
can tell bad input from a bug."""


class MoeGraphError(Exception):
    """Base class: a problem with the user's input or request, with a message that names it."""


class GGUFError(MoeGraphError):
    """The file is missing, not a GGUF, truncated, or holds something we cannot read."""


class ModelError(MoeGraphError):
    """The GGUF is readable but does not describe a model we can build (architecture, tensors)."""


class IRError(MoeGraphError):
    """An op was used against its definition (wrong inputs, shapes, dtypes or attributes)."""


class InputError(MoeGraphError):
    """A request the model cannot serve: token id out of range, sequence longer than the context."""


class SessionBusyError(MoeGraphError):
    """A session (one sequence, one KV cache) was used by a second thread while a call was running."""


class NumericalError(MoeGraphError):
    """A computation produced NaN or Inf where a model never should (e.g. the logits)."""
