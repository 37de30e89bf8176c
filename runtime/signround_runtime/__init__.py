"""CPU runtime for ONNX models exported by signround-export (onnxruntime, numpy, tokenizers only)."""

__version__ = "0.1.0"
