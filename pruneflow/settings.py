"""Deployment settings: where things live and what a DAG conf may name, from ``PRUNEFLOW_*`` variables.

Pure Python (no torch, no Airflow). Every process of a deployment — the CLI, the Airflow tasks on any
worker, the plugin — reads the same variables, so every task of a run resolves paths the same way:

``PRUNEFLOW_HOME``            project root (default: the folder holding the ``pruneflow`` package)
``PRUNEFLOW_ARTIFACTS``       artifact root (default ``<home>/out/trials``); a URL (``s3://bucket/prefix``)
                              puts the trials' files in an object store (:mod:`pruneflow.workspace`)
``PRUNEFLOW_SCRATCH``         with a URL artifact root: the local folder the stages work in
                              (default ``<home>/out/scratch``)
``PRUNEFLOW_ARTIFACT_CACHE``  with a URL artifact root: the content-addressed download cache
                              (default ``<home>/out/artifact-cache``)
``PRUNEFLOW_DB``              results DB SQLAlchemy URL (default ``sqlite:///<home>/out/pruneflow.db``)
``PRUNEFLOW_BASELINES``       folder of named baselines (default ``<home>/out/baselines``)
``PRUNEFLOW_REPORTS``         folder of sweep reports (default ``<home>/out/reports``)
``PRUNEFLOW_DATA_ROOTS``      folders a DAG conf's data paths and Distiller schedules may lie under,
                              separated by ``:`` (default ``<home>/data``)
``PRUNEFLOW_ALLOWED_MODELS``  user models (``package.module:factory``) a DAG conf may name, comma-separated
                              (default: none; registry models are always allowed)
``PRUNEFLOW_ALLOWED_DBS``     further results DB URLs a DAG conf may name, comma-separated (default: none)
``PRUNEFLOW_CPU_TASKS``       the host's folder of running torch tasks, which a benchmark stops while it
                              measures (:mod:`pruneflow.cpu_pause`; default ``<tmp>/pruneflow-cpu-tasks-<uid>``)

Relative paths (and relative SQLite URLs) are taken relative to ``<home>``, never to a process's
current directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from pruneflow.constants import ID_RE, ID_RULE


def project_home() -> Path:
    env = os.environ.get("PRUNEFLOW_HOME")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parents[1]


def under_home(path: str) -> str:
    """An absolute path: relative ones are taken relative to the project home."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else project_home() / p)


def sqlite_absolute(url: str) -> str:
    """sqlite:///relative.db -> sqlite:////<home>/relative.db; other URLs unchanged."""
    m = re.match(r"^(sqlite(?:\+\w+)?:///)([^?]*)(\?.*)?$", url)
    if not m or not m.group(2) or m.group(2) == ":memory:" or m.group(2).startswith("/"):
        return url
    return f"{m.group(1)}{project_home() / m.group(2)}{m.group(3) or ''}"


def _list(name: str, sep: str = ",") -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(sep) if v.strip()]


def artifact_store_url() -> str | None:
    """``PRUNEFLOW_ARTIFACTS`` when it is a URL (an object store), else None (a local folder)."""
    from pruneflow.artifacts import is_url  # light: fsspec is imported only by ArtifactStore

    raw = (os.environ.get("PRUNEFLOW_ARTIFACTS") or "").strip()
    return raw.rstrip("/") if raw and is_url(raw) else None


def artifacts_root() -> str:
    """The local folder trial folders live in: the artifact root itself, or with a URL artifact root the
    scratch folder the stages work in (their files go to the store after each stage)."""
    if artifact_store_url():
        return under_home(os.environ.get("PRUNEFLOW_SCRATCH") or "out/scratch")
    return under_home(os.environ.get("PRUNEFLOW_ARTIFACTS") or "out/trials")


def artifact_cache() -> str:
    return under_home(os.environ.get("PRUNEFLOW_ARTIFACT_CACHE") or "out/artifact-cache")


def results_db() -> str:
    return sqlite_absolute(os.environ.get("PRUNEFLOW_DB") or "sqlite:///out/pruneflow.db")


def baselines_root() -> str:
    return under_home(os.environ.get("PRUNEFLOW_BASELINES") or "out/baselines")


def reports_root() -> Path:
    return Path(under_home(os.environ.get("PRUNEFLOW_REPORTS") or "out/reports"))


def cpu_tasks_dir() -> Path:
    """Where this host's torch tasks register (one folder per user, shared by every deployment of the host:
    they share its cores)."""
    raw = (os.environ.get("PRUNEFLOW_CPU_TASKS") or "").strip()
    if raw:
        return Path(under_home(raw))
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"pruneflow-cpu-tasks-{user}"


def data_roots() -> list[str]:
    return [under_home(p) for p in _list("PRUNEFLOW_DATA_ROOTS", os.pathsep)] or [under_home("data")]


def allowed_models() -> list[str]:
    return _list("PRUNEFLOW_ALLOWED_MODELS")


def allowed_dbs() -> list[str]:
    return [results_db(), *(sqlite_absolute(u) for u in _list("PRUNEFLOW_ALLOWED_DBS"))]


# ------------------------------------------------------------------------------------ named baselines

def baseline_name(model: str, dataset: str, image_size: int | None, model_kwargs: dict | None = None) -> str:
    """The default named baseline of a model/data set/size, e.g. ``resnet20-digits-32``
    (model keyword arguments, which change the network, add a short hash: ``vgg11-digits-32-1a2b3c4d``)."""
    name = f"{model}-{dataset}-{image_size or 'native'}"
    if model_kwargs:
        name += "-" + hashlib.sha1(json.dumps(model_kwargs, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return safe_id(name)


def safe_id(text: str) -> str:
    """An id from any text: characters outside ``[A-Za-z0-9_.@=-]`` become ``_``; over 100 characters keep
    91 and a hash. e.g. ``manual__2026-11-02T10:00:00+00:00`` -> ``manual__2026-11-02T10_00_00_00_00``."""
    s = re.sub(r"[^A-Za-z0-9_.@=-]", "_", str(text)).lstrip("_.@=-") or "run"
    if len(s) > 100:
        s = f"{s[:91]}-{hashlib.sha1(str(text).encode()).hexdigest()[:8]}"
    return s


def is_baseline_path(value: str) -> bool:
    """A value with a '/' or ending in '.pt' is a checkpoint path; anything else is a baseline name."""
    return "/" in value or value.endswith(".pt")


def resolve_baseline(value: str | None, model: str, dataset: str, image_size: int | None,
                     model_kwargs: dict | None = None) -> str:
    """The baseline checkpoint path: a name -> ``<baselines>/<name>/baseline.pt``; a path stays a path
    (relative to the home). None or empty: the default name of the model, data set and size."""
    value = (value or "").strip() or baseline_name(model, dataset, image_size, model_kwargs)
    if is_baseline_path(value):
        return under_home(value)
    if not ID_RE.fullmatch(value):
        raise ValueError(f"a baseline name must be {ID_RULE} (or give the path of a .pt checkpoint)")
    return str(Path(baselines_root()) / value / "baseline.pt")


def is_named_baseline(checkpoint: str) -> bool:
    """True when the checkpoint is a named baseline in the baselines folder (one that may be trained)."""
    p = Path(checkpoint)
    return p.name == "baseline.pt" and p.parent.parent == Path(baselines_root())
