"""How far a correct thinning and a correct export differ from their reference, relative to the outputs' scale.

For a trained ResNet-20 (the benchmarks' digits baseline, 1x32x32) and every registry model (3x32x32,
10 classes; weights as initialised, BatchNorm statistics estimated on random images so activations are
normalised as in a trained network), with its classifier's weights and
bias scaled by 1, 1000 and 0.001 (logits near 1, in the thousands, and tiny): plan the random removal of
half the filters of every prunable layer, thin it, and compare the thinned model with the masked one;
then export the thinned model to ONNX and OpenVINO IR and compare ONNX Runtime and OpenVINO (f32, and
bf16/f16 where this CPU runs them) with torch. Each comparison is printed as the max abs diff and that
difference over max |reference| (the relative difference the checks' ``rtol`` bounds), with the worst
over all models per check below: the checks' defaults (``pruneflow.constants``) are chosen from it.

    .venv/bin/python benchmarks/output_tolerance.py [--models resnet20,mobilenetv2] [--samples 16]

Never run by CI; it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_header, say, table  # noqa: E402

SCALES = (1.0, 1000.0, 0.001)
SHAPE = [1, 3, 32, 32]


def _prepared(name: str, scale: float):
    """(model, input shape): a registry model as initialised, or ``trained`` (the benchmarks' ResNet-20
    digits baseline), its head scaled."""
    import torch

    from pruneflow.prune import classifier_layer

    torch.manual_seed(0)
    if name == "trained":
        from _common import ensure_baseline

        from pruneflow.checkpoint import load_checkpoint

        model, payload = load_checkpoint(ensure_baseline(epochs=3, progress=say))
        shape = list(payload["input_shape"])
    else:
        from pruneflow.models import build_model
        from pruneflow.recalibrate import recalibrate

        model, shape = build_model(name, 3, 10), SHAPE
        recalibrate(model, torch.randn(256, *shape[1:]), 32)
    head = dict(model.named_modules())[classifier_layer(model, shape)]
    with torch.no_grad():
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.mul_(scale)
    return model.eval(), shape


def _ov_precisions() -> list[str]:
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return [p for p, cap in (("bf16", "BF16"), ("f16", "FP16")) if cap in caps]


def measure_model(name: str, scale: float, samples: int, precisions: list[str]) -> dict:
    import torch

    from pruneflow.bench.output_check import max_abs_diff, output_scale
    from pruneflow.export import _run_onnxruntime, _run_openvino, export_onnx, export_openvino
    from pruneflow.prune import GroupRequest, make_plan, masked_copy, thin

    model, shape = _prepared(name, scale)
    torch.manual_seed(1)
    x = torch.randn(samples, *shape[1:])
    plan = make_plan(model, shape, [GroupRequest("all", ["*"], 0.5, "random")], seed=0)
    thinned, _ = thin(model, plan)
    masked = masked_copy(model, plan)
    with torch.no_grad():
        ref_masked = masked(x).numpy()
        ref = torch.cat([thinned(xi[None]) for xi in x]).numpy()
    row = {"model": name, "head": scale, "scale": output_scale(ref_masked)}
    row["thin"] = max_abs_diff(thinned(x).detach().numpy(), ref_masked)
    xs = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(thinned, shape, Path(tmp) / "m.onnx")
        xml = export_openvino(onnx, Path(tmp) / "m.xml", shape)
        row["onnxruntime"] = max_abs_diff(_run_onnxruntime(onnx, xs), ref)
        for p in ["f32", *precisions]:
            row[f"openvino {p}"] = max_abs_diff(_run_openvino(xml, xs, p), ref)
    row["ref_scale"] = output_scale(ref)
    return row


def main(argv=None) -> int:
    from pruneflow.models import list_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(["trained", *list_models()]),
                    help="registry names, and 'trained' for the benchmarks' ResNet-20 digits baseline (3 epochs)")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args(argv)
    precisions = _ov_precisions()
    checks = ["thin", "onnxruntime", "openvino f32", *[f"openvino {p}" for p in precisions]]
    rows = []
    for name in args.models.split(","):
        for scale in SCALES:
            say(f"{name}, head x{scale:g}")
            try:
                rows.append(measure_model(name, scale, args.samples, precisions))
            except Exception as exc:  # a model this shape cannot take: say so, measure the rest
                say(f"  {name}: {type(exc).__name__}: {exc}")
    print(machine_header("Output checks: differences of correct thinning and export, relative to the outputs"))
    print(f"samples: {args.samples} random 3x32x32 images; plan: random criterion, 0.5 of every prunable layer\n")
    headers = ["model", "head x", "max |ref|", *[f"{c} abs / rel" for c in checks]]

    def cell(r, c):
        scale = r["scale"] if c == "thin" else r["ref_scale"]
        return f"{r[c]:.2g} / {r[c] / scale:.2g}"

    print(table(headers, [[r["model"], f"{r['head']:g}", f"{r['scale']:.3g}", *[cell(r, c) for c in checks]]
                          for r in rows], align_left=2))
    worst = []
    for c in checks:
        rel = [(r[c] / (r["scale"] if c == "thin" else r["ref_scale"]), r["model"], r["head"]) for r in rows]
        top = max(rel)
        worst.append([c, f"{top[0]:.3g}", f"{top[1]} x{top[2]:g}",
                      f"{max(r[c] for r in rows if r['head'] == 0.001):.3g}"])
    print("\nworst relative difference per check (over every model and head scale), and the largest absolute "
          "difference with tiny logits (head x0.001):\n")
    print(table(["check", "worst max|diff| / max|ref|", "where", "max abs diff at head x0.001"], worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
