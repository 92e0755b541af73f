"""moegraph: a graph compiler for Mixture-of-Experts LLM inference from GGUF files.

    import moegraph
    model = moegraph.load("model.gguf")
    session = model.compile(backend="numpy")
    logits = session.forward(model.tokenizer.encode("In the beginning"))
"""
from .errors import GGUFError, InputError, IRError, ModelError, MoeGraphError
from .runtime import GenerationStats, Model, PerplexityResult, Session, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "Session", "GenerationStats", "PerplexityResult", "MoeGraphError",
           "GGUFError", "ModelError", "IRError", "InputError", "__version__"]
