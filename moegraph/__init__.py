"""moegraph: a graph compiler for Mixture-of-Experts LLM inference from GGUF files.

    import moegraph
    model = moegraph.load("model.gguf")
    session = model.compile(backend="numpy")
    logits = session.forward(model.tokenizer.encode("In the beginning"))
"""
from .errors import GGUFError, InputError, IRError, ModelError, MoeGraphError, NumericalError, SessionBusyError
from .runtime import GenerationStats, Model, PerplexityResult, Session, load
from .quantize import quantize  # noqa: E402  (moegraph.quantize(...) is the function)
from .api import Llama  # noqa: E402  (llama-cpp-python's shape: Llama(path)(prompt), create_chat_completion)

__version__ = "0.1.0"
__all__ = ["load", "quantize", "Llama", "Model", "Session", "GenerationStats", "PerplexityResult", "MoeGraphError",
           "GGUFError", "ModelError", "IRError", "InputError", "NumericalError", "SessionBusyError", "__version__"]
