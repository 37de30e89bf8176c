"""CPU runtime for ONNX models exported by signround-export (onnxruntime, numpy, tokenizers, jinja2 only)."""

from .model import Generation, Model, RuntimeModelError
from .sampling import Sampling

__version__ = "0.1.0"
__all__ = ["Model", "Generation", "RuntimeModelError", "Sampling"]
