"""A stage's local workspace when the artifact root is an object store (``PRUNEFLOW_ARTIFACTS=s3://...``).

Before a stage: the trial's files it reads are fetched from the store into the trial's scratch folder
(``settings.artifacts_root()``), through the verified content-addressed cache; the benchmark stage
fetches only the exported model, the reference batch and ``epochs.json`` (to know whether the trial was
abandoned), the others everything the trial has stored so far. After the stage: the files it wrote
(:data:`pruneflow.stages.STAGE_FILES`) are uploaded with their checksums, and the manifest forgets
what the stage and later ones wrote in an earlier attempt. With a local artifact root this does nothing.

A stage that fails uploads nothing; a failed upload fails the stage (with the URL named), so the trial is
recorded failed and the store never names a file it does not hold.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from pruneflow import settings
from pruneflow.spec import TrialSpec


def needed(stage: str, spec: TrialSpec, stored: Sequence[str]) -> list[str]:
    """The stored files ``stage`` reads (only those that exist in the store)."""
    from pruneflow.stages import STAGE_FILES

    if stage == "benchmark":
        model = ["model.xml", "model.bin"] if spec.benchmark.backend == "openvino" else ["model.onnx", "model.onnx.data"]
        wanted = ["epochs.json", "reference.npz", *model]
    elif stage == "record":  # the results, not the models
        wanted = [n for names in STAGE_FILES.values() for n in names if n.endswith(".json")]
    else:  # the training host: everything earlier stages wrote
        order = list(STAGE_FILES)
        wanted = [n for later in order[: order.index(stage)] for n in STAGE_FILES[later]]
    return [n for n in wanted if n in stored]


@contextlib.contextmanager
def stage_workspace(spec: TrialSpec, stages: Sequence[str], progress=lambda _m: None) -> Iterator[None]:
    """Run ``stages`` (e.g. ``("prepare", "prune")``) of the trial in its local folder, synchronised with
    the object store before and after; a no-op for a local artifact root."""
    url = settings.artifact_store_url()
    if url is None or not stages:
        yield
        return
    from pruneflow.artifacts import ArtifactStore
    from pruneflow.stages import STAGE_FILES

    store = ArtifactStore(url)
    trial_dir = spec.trial_dir()
    trial_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = store.manifest(spec.trial_id)
    names = needed(stages[0], spec, list(manifest))
    store.fetch(spec.trial_id, names, settings.artifact_cache(), into=trial_dir, manifest=manifest)
    size = sum(manifest[n]["size"] for n in names)
    progress(f"artifacts: {len(names)} file(s), {size:,} bytes from {store.trial_url(spec.trial_id)} "
             f"({time.perf_counter() - t0:.2f} s)")
    yield
    order = list(STAGE_FILES)
    mine = [n for st in stages for n in STAGE_FILES[st]]
    stale = [n for later in order[order.index(stages[0]):] for n in STAGE_FILES[later]]
    produced = [n for n in mine if (trial_dir / n).is_file()]
    t0 = time.perf_counter()
    store.upload(spec.trial_id, trial_dir, produced, forget=[n for n in stale if n not in produced])
    size = sum((trial_dir / n).stat().st_size for n in produced)
    progress(f"artifacts: {len(produced)} file(s), {size:,} bytes to {store.trial_url(spec.trial_id)} "
             f"({time.perf_counter() - t0:.2f} s)")


def artifact_location(spec: TrialSpec) -> str:
    """What the results DB records as the trial's artifact folder: the store URL, or the local path."""
    url = settings.artifact_store_url()
    return f"{url}/{spec.trial_id}" if url else str(spec.trial_dir().resolve())
