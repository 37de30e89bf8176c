"""An ONNX graph written node by node: initializers and nodes with unique names, then one model.

The initializers' bytes go to an external-data file as they are made (InitializerFile), so building the
graph of a model holds about one layer of weights; a model whose data fits in one protobuf is then
written as one file, exactly as if the bytes had stayed in the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

OPSET = 17
IR_VERSION = 8  # the IR of opset 17; onnx writes its newest IR by default, which older onnxruntime refuses
MS = "com.microsoft"  # the domain of onnxruntime's contrib ops (MatMulNBits, GroupQueryAttention, ...)

FLOAT, INT32, INT64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def tensor_info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    """A graph input or output; strings in `shape` are symbolic dimensions."""
    return helper.make_tensor_value_info(name, elem_type, shape)


def inline_size(tensor: TensorProto, nbytes: int) -> int:
    """The serialized size of a tensor that has no raw_data yet once `nbytes` of raw_data are in it: the
    field's one-byte tag (field 9, length-delimited), the length as a varint, the bytes."""
    return tensor.ByteSize() + 1 + max(1, (nbytes.bit_length() + 6) // 7) + nbytes


class InitializerFile:
    """Initializers' bytes appended to one external-data file as they are made. Tensors of at least
    MIN_BYTES go there (smaller ones stay in the graph, as onnx.save_model's default threshold keeps
    them), each at an offset aligned to ALIGN bytes (a page: readers may map them)."""

    MIN_BYTES = 1024
    ALIGN = 4096

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")

    def put(self, tensor: TensorProto, array: np.ndarray) -> None:
        """Write array's bytes to the file now (from its own buffer: no copy) and point tensor at them."""
        self.file.write(b"\0" * (-self.file.tell() % self.ALIGN))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.file.tell()), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.file.write(array.reshape(-1).view(np.uint8))

    def close(self) -> None:
        self.file.close()

    def inline(self, tensors) -> None:
        """Bring the bytes of every tensor written here back into it, and remove the file: the tensors are
        then as numpy_helper.from_array makes them."""
        self.close()
        with open(self.path, "rb") as f:
            for tensor in tensors:
                if tensor.data_location != TensorProto.EXTERNAL:
                    continue
                info = ExternalDataInfo(tensor)
                f.seek(info.offset)
                tensor.raw_data = f.read(info.length)
                del tensor.external_data[:]
                tensor.ClearField("data_location")
        self.path.unlink()


class GraphBuilder:
    """Nodes and initializers in the order they are made; op() names each node after its type and rank.
    With `data`, large initializers' bytes go to that file as they are made."""

    def __init__(self, data: InitializerFile | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.data = data
        self.bytes = 0  # the initializers' serialized size with their bytes in the graph

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; returns its name."""
        array = np.ascontiguousarray(array)
        if self.data is not None and array.nbytes >= self.data.MIN_BYTES:
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # ONNX's byte order
            tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
            self.bytes += inline_size(tensor, array.nbytes)
            self.data.put(tensor, array)
        else:
            tensor = numpy_helper.from_array(array, name)
            self.bytes += tensor.ByteSize()
        self.initializers.append(tensor)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        """A node; returns its output name, or the list of them when it has several."""
        self.count += 1
        name = f"/{op_type}_{self.count}"
        outputs = outputs or [f"{name}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def initializer_bytes(self) -> int:
        """The initializers' size in one protobuf (protobuf holds at most 2 GB)."""
        return self.bytes

    def model(self, name: str, inputs: list, outputs: list, producer: str) -> onnx.ModelProto:
        """The model of everything made so far, at opset OPSET with onnxruntime's contrib domain."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name=producer)
        model.ir_version = IR_VERSION
        return model

