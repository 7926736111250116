"""OpenVINO's telemetry is declined where pruneflow exports: left on, every ``ov.convert_model`` forks the
whole task process once per event to reach Google Analytics (benchmarks/RESULTS.md, "OpenVINO telemetry")."""

import torch

from pruneflow.export import export_onnx, export_openvino


def test_an_export_after_make_install_sends_no_telemetry(tmp_path):
    import openvino_telemetry

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    onnx_path = export_onnx(model, [1, 1, 8, 8], tmp_path / "m.onnx")
    export_openvino(onnx_path, tmp_path / "m.xml", [1, 1, 8, 8])
    # convert_model configured the telemetry singleton; make install's `opt_in_out --opt_out` made it decline
    assert openvino_telemetry.Telemetry().consent is False
