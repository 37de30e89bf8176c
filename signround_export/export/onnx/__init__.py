"""ONNX export: a checkpoint as an onnxruntime graph over MatMulNBits weights (build), the weights'
packing (matmulnbits), the stacked q/k/v and gate/up weights (stacking), genai_config.json (genai)."""

from .build import ONNXExport, export_onnx
from .matmulnbits import NBitsWeight, dequantize_nbits, pack_codes, to_nbits
from .stacking import stacked_modules

__all__ = ["NBitsWeight", "ONNXExport", "dequantize_nbits", "export_onnx", "pack_codes",
           "stacked_modules", "to_nbits"]
