"""Export to ONNX (one file, static input shape) and OpenVINO IR, with output parity checked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ParityError(RuntimeError):
    """An exported model whose outputs differ from torch's beyond the tolerance (or whose predicted classes
    do not agree with torch's)."""


def export_onnx(model: nn.Module, input_shape: list[int], path: str | Path, opset: int = 18,
                exporter: str = "torchscript") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = torch.zeros(*input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torchscript exporter's deprecation notice, once per call
        torch.onnx.export(
            model, (x,), str(path),
            dynamo=exporter == "dynamo",
            external_data=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=opset,
        )
    sidecar = Path(str(path) + ".data")
    if sidecar.exists():
        raise RuntimeError(f"{path}: exporter wrote an external-data sidecar; expected one file")
    return path


def export_openvino(onnx_path: str | Path, xml_path: str | Path, input_shape: list[int],
                    compress_to_fp16: bool = False) -> Path:
    import openvino as ov

    xml_path = Path(xml_path)
    ov_model = ov.convert_model(str(onnx_path), input=[list(input_shape)])
    if ov_model.inputs[0].partial_shape.is_dynamic:
        raise RuntimeError(f"{xml_path}: OpenVINO model has a dynamic input shape")
    ov.save_model(ov_model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path


def _run_onnxruntime(onnx_path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[None]})[0] for x in inputs])


def _run_openvino(xml_path: Path, inputs: np.ndarray, precision: str = "f32") -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    # f32 explicitly: CPUs with AMX/AVX512-BF16 would otherwise run bf16 and fail parity for the wrong reason
    compiled = core.compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    outs = []
    for x in inputs:
        request.infer({0: x[None]})
        outs.append(np.array(request.get_output_tensor(0).data, copy=True))
    return np.concatenate(outs)


@torch.no_grad()
def check_parity(model: nn.Module, onnx_path: Path, xml_path: Path, inputs: torch.Tensor, atol: float,
                 rtol: float) -> dict:
    """Compare ONNX Runtime's and OpenVINO's outputs with torch's on the same inputs (batch 1 each), by the
    rule of :mod:`pruneflow.bench.output_check`: one record per runtime, ``passed`` when both pass."""
    from pruneflow.bench.output_check import compare_outputs

    model.eval()
    ref = torch.cat([model(x[None]) for x in inputs]).numpy()
    xs = inputs.numpy().astype(np.float32)
    runtimes = {"onnxruntime": _run_onnxruntime(onnx_path, xs), "openvino": _run_openvino(xml_path, xs)}
    checks = {name: compare_outputs(out, ref, atol=atol, rtol=rtol) for name, out in runtimes.items()}
    result = {"samples": len(xs), "atol": atol, "rtol": rtol, "checks": checks,
              "passed": all(c["passed"] for c in checks.values())}
    for name, c in checks.items():  # the flat keys readers of parity.json already use
        result[f"{name}_max_abs_diff"] = c["max_abs_diff"]
        result[f"{name}_argmax_agreement"] = c["argmax_agreement"]
    return result


def save_reference(path: Path, inputs: torch.Tensor, model: nn.Module) -> Path:
    """Inputs and torch outputs, so the (torch-free) benchmark can check outputs before timing."""
    # every parity sample, run one at a time like the batch-1 model: the benchmark's class-agreement check
    # at f16/bf16 needs more than one image to mean anything
    with torch.no_grad():
        out = torch.cat([model.eval()(x[None]) for x in inputs]).numpy()
    np.savez(path, input=inputs.numpy().astype(np.float32), output=out)
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
