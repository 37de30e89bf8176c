"""GGUF files for llama.cpp: the registry of GGUF types (types.py), their block layouts (blocks.py),
a checkpoint's tensors encoded in them (encode.py), the file written (write.py: export_gguf) and
read back (read.py), and llama.cpp's per-tensor type mixes for tuning (mixes.py)."""

from ...errors import GGUFExportError
from .encode import holds_exactly
from .read import read_gguf_weights
from .types import GGUF_TYPES, GGUFType
from .write import GGUFExport, TensorRecord, export_gguf

__all__ = ["GGUF_TYPES", "GGUFExport", "GGUFExportError", "GGUFType", "TensorRecord", "export_gguf", "holds_exactly",
           "read_gguf_weights"]
