"""What OpenVINO's telemetry costs an export: ``ov.convert_model`` of one exported ResNet-20 ONNX file, five
times in each of two fresh processes, one whose user accepted telemetry and one whose user declined it (each
with its own HOME holding the consent file that ``opt_in_out`` writes). ``make install`` declines it.

    .venv/bin/python benchmarks/openvino_telemetry.py

Both processes import torch first, as a task process has: each telemetry event forks the whole process.
Never run by CI.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, ensure_baseline, machine_header, table  # noqa: E402

CHILD = """
import json, os, sys, time
import torch  # noqa: F401  (a task process has it: telemetry forks the whole process)
import openvino as ov
times = []
for _ in range(5):
    t = time.perf_counter()
    ov.convert_model(sys.argv[1], input=[json.loads(sys.argv[2])])
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "threads": len(os.listdir("/proc/self/task"))}))
"""


def onnx_file() -> tuple[Path, list[int]]:
    import torch

    from pruneflow.checkpoint import load_checkpoint
    from pruneflow.export import export_onnx

    model, meta = load_checkpoint(ensure_baseline())
    shape = list(meta["input_shape"])  # batch included, as the export stage uses it
    return export_onnx(model.to(torch.float32), shape, OUT / "openvino_telemetry" / "model.onnx"), shape


def convert_times(onnx: Path, shape: list[int], consent: str) -> dict:
    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "intel").mkdir()
        (Path(home) / "intel" / "openvino_telemetry").write_text(consent)
        out = subprocess.run([sys.executable, "-c", CHILD, str(onnx), json.dumps(shape)], check=True,
                             capture_output=True, text=True, env={**os.environ, "HOME": home})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    print(machine_header("openvino_telemetry: ov.convert_model with telemetry accepted and declined"))
    onnx, shape = onnx_file()
    runs = {name: convert_times(onnx, shape, consent) for name, consent in (("accepted", "1"), ("declined", "0"))}
    declined = statistics.median(runs["declined"]["times"])
    rows = [[name, " ".join(f"{t:.3f}" for t in r["times"]), f"{statistics.median(r['times']):.3f}",
             r["threads"], f"{statistics.median(r['times']) / declined:.1f}x"] for name, r in runs.items()]
    print(table(["telemetry", "5 conversions s", "median s", "threads after", "vs declined"], rows))


if __name__ == "__main__":
    main()
