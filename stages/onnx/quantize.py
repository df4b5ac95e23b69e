"""ONNX Runtime's own weight quantization of an exported graph.

- ``int4``: ``MatMulNBitsQuantizer`` — each constant-weight ``MatMul`` becomes a
  ``MatMulNBits`` node (4-bit blocks along the input dimension, float scales), weight-only;
  activations stay float. ``accuracy_level`` is left at ORT's default: level 4 (int8
  activations) flips the greedy argmax on outlier-heavy LLMs (microsoft/onnxruntime#29849).
- ``int8``: ``quantize_dynamic`` — per-channel int8 weights, activations quantized at run
  time (``DynamicQuantizeLinear`` + ``MatMulInteger``).

The projection to the vocabulary (the ``MatMul`` producing ``logits``) is kept in full
precision by default: an int4 lm_head is known to cause repetition (microsoft/onnxruntime#24384)
and GPTQ/AWQ leave it alone too.
"""
from __future__ import annotations

from pathlib import Path


def lm_head_nodes(model) -> list[str]:
    """Names of the MatMul/Gemm nodes that compute ``logits`` (walking back through shape-only ops)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    passthrough = {"Reshape", "Cast", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Add"}
    found, todo, seen = [], ["logits"], set()
    while todo:
        name = todo.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
        elif node.op_type in passthrough:
            todo.extend(node.input[:1])
    return found


def quantize_graph(src: Path, dst: Path, kind: str, *, block_size: int = 32, symmetric: bool = True,
                   keep_lm_head: bool = True, external_data: bool = False) -> dict:
    """Quantize the graph at ``src`` into ``dst`` (``int4`` or ``int8``); returns what was done.

    Example::

        quantize_graph(Path("fp32/model.onnx"), Path("out/model.onnx"), "int4", block_size=32)
    """
    import onnx

    model = onnx.load(str(src))  # with its external data, if any
    exclude = lm_head_nodes(model) if keep_lm_head else []
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data_name = dst.name + ".data"
    if kind == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=None,
                                           op_types_to_quantize=("MatMul",))
        quant = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=cfg)
        quant.process()
        out = quant.model.model
        if external_data:
            onnx.save_model(out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(out, str(dst))
    elif kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model, str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=external_data)  # its data file: named by ORT, kept as is
    else:
        raise ValueError(f"unknown ONNX quantization {kind!r}")
    return {"kept_full_precision": exclude, "block_size": block_size if kind == "int4" else None}
