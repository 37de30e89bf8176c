"""An ONNX graph written node by node: initializers and nodes with unique names, then one model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR of opset 17; onnx writes its newest IR by default, which older onnxruntime refuses
MS = "com.microsoft"  # the domain of onnxruntime's contrib ops (MatMulNBits, GroupQueryAttention, ...)

FLOAT, INT32, INT64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def tensor_info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    """A graph input or output; strings in `shape` are symbolic dimensions."""
    return helper.make_tensor_value_info(name, elem_type, shape)


class GraphBuilder:
    """Nodes and initializers in the order they are made; op() names each node after its type and rank."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; returns its name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        """A node; returns its output name, or the list of them when it has several."""
        self.count += 1
        name = f"/{op_type}_{self.count}"
        outputs = outputs or [f"{name}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def initializer_bytes(self) -> int:
        return sum(t.ByteSize() for t in self.initializers)

    def model(self, name: str, inputs: list, outputs: list, producer: str) -> onnx.ModelProto:
        """The model of everything made so far, at opset OPSET with onnxruntime's contrib domain."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name=producer)
        model.ir_version = IR_VERSION
        return model
