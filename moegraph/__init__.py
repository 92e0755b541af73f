"""moegraph: a graph compiler for Mixture-of-Experts LLM inference from GGUF files.

    import moegraph
    model = moegraph.load("model.gguf")
    session = model.compile(backend="numpy")
    logits = session.forward(model.tokenizer.encode("In the beginning"))
"""
from .errors import GGUFError, InputError, IRError, ModelError, MoeGraphError, NumericalError, SessionBusyError
from .runtime import GenerationStats, Model, PerplexityResult, Session, load
from .quantize import quantize  # noqa: E402  (moegraph.quantize(...) is the function)

__version__ = "0.1.0"
__all__ = ["load", "quantize", "Model", "Session", "GenerationStats", "PerplexityResult", "MoeGraphError",
           "GGUFError", "ModelError", "IRError", "InputError", "NumericalError", "SessionBusyError", "__version__"]
