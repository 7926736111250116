"""The flat DAG conf is generated from the trial spec (one source of truth), and a conf stays within the
deployment's limits: no code import, no path outside the configured roots, no unconfigured results DB."""

from __future__ import annotations

import os
import typing

import pytest
from pydantic import BaseModel

from pruneflow import trial_conf
from pruneflow.constants import MODEL_NAMES
from pruneflow.spec import SpecError, TrialSpec


@pytest.fixture
def roots(monkeypatch, tmp_path):
    for name, sub in (("PRUNEFLOW_ARTIFACTS", "a"), ("PRUNEFLOW_BASELINES", "b"), ("PRUNEFLOW_DATA_ROOTS", "data"),
                      ("PRUNEFLOW_REPORTS", "r")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.setenv("PRUNEFLOW_DB", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("PRUNEFLOW_ALLOWED_MODELS", raising=False)
    monkeypatch.delenv("PRUNEFLOW_ALLOWED_DBS", raising=False)
    return tmp_path


def _spec_leaves(model: type[BaseModel], prefix=()) -> set[tuple[str, ...]]:
    """Every leaf field of the spec, walked independently of trial_conf."""
    out = set()
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        args = () if typing.get_origin(field.annotation) in (list, dict) else typing.get_args(field.annotation)
        sub = next((a for a in (field.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and path != ("sweep",):
            out |= _spec_leaves(sub, path)
        else:
            out.add(path)
    return out


def test_every_spec_field_is_one_conf_key_with_the_specs_default_and_help():
    keys = {k.path: k for k in trial_conf.conf_keys() if k.path}
    assert set(keys) == _spec_leaves(TrialSpec)
    dense = TrialSpec()
    for path, k in keys.items():
        assert k.description and k.section and k.title, path
        if path not in (("pruning", "groups"), ("artifacts",), ("db",)):
            value = dense
            for p in path:
                value = getattr(value, p)
            value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            assert k.default == value, path
    lr = keys[("finetune", "lr")]
    field = TrialSpec.model_fields["finetune"].annotation.model_fields["lr"]
    assert lr.key == "lr" and lr.schema["exclusiveMinimum"] == 0 and lr.schema["maximum"] == 10
    assert lr.description.lower().startswith(field.description.lower())


def test_optional_settings_are_not_required_in_the_form():
    # Airflow's form marks a field required unless "null" is among its types
    by_key = {k.key: k for k in trial_conf.form_fields()}
    for key in ("ignored_layers", "sparsities", "trial_id", "study", "baseline", "data_path", "round_to",
                "model_kwargs", "spec_overrides", "artifacts", "db", "distiller_schedule"):
        assert "null" in by_key[key].schema["type"], key
    assert "null" not in by_key["lr"].schema["type"]


def test_a_new_spec_field_shows_up_in_the_conf_with_no_other_edit():
    from pydantic import Field

    from pruneflow.spec import FinetuneSpec

    class Finetune2(FinetuneSpec):
        label_smoothing: float = Field(0.0, ge=0, le=1, description="label smoothing of the loss")

    class Spec2(TrialSpec):
        finetune: Finetune2 = Field(default_factory=Finetune2)

    keys = {k.key: k for k in trial_conf.generate_keys(Spec2, trial_conf._NAMES, trial_conf._SECTION_OF)}
    k = keys["finetune_label_smoothing"]
    assert (k.default, k.schema["maximum"], k.section) == (0.0, 1, trial_conf.FINETUNE)
    assert k.description == "Label smoothing of the loss."


def test_conf_round_trips_every_field(roots):
    spec = trial_conf.spec_from_conf({"name": "rt", "epochs": 3, "lr": 0.2, "finetune_batch_size": 16,
                                      "export_opset": 17, "benchmark_seed": 4, "ignored_layers": ["layer1.0.conv1"],
                                      "round_to": 8, "dataset_max_train_samples": 64, "baseline_epochs": 2,
                                      "sweep": {"optuna_trial_number": 3}}, "run-1")
    conf = trial_conf.conf_from_spec(spec)
    assert set(conf) == {k.key for k in trial_conf.conf_keys() if k.path}
    assert trial_conf.spec_from_conf(conf, "another-run") == spec
    assert (spec.finetune.batch_size, spec.export.opset, spec.benchmark.seed, spec.sweep.optuna_trial_number) == (
        16, 17, 4, 3)


def test_conf_never_imports_a_model_it_is_not_allowed(roots, monkeypatch):
    marker = roots / "marker"
    conf = {"model": "os:system", "model_kwargs": {"command": f"touch {marker}"}}
    with pytest.raises(SpecError, match=r"model: 'os:system' is not allowed"):
        trial_conf.spec_from_conf(conf, "r")
    with pytest.raises(SpecError, match=r"model: 'os:system' is not allowed"):  # nor through the overrides
        trial_conf.spec_from_conf({"spec_overrides": {"model": {"name": "os:system"}}}, "r")
    assert not marker.exists()
    # the Param schema says it too, so the REST API answers 400 before any task runs
    assert trial_conf.form_fields()[[k.key for k in trial_conf.form_fields()].index("model")].schema["enum"] == [
        *MODEL_NAMES]
    monkeypatch.setenv("PRUNEFLOW_ALLOWED_MODELS", "user_models:tiny_net")
    spec = trial_conf.spec_from_conf({"model": "user_models:tiny_net"}, "r")
    assert spec.model.name == "user_models:tiny_net"
    assert "user_models:tiny_net" in {k.key: k for k in trial_conf.form_fields()}["model"].schema["enum"]


@pytest.mark.parametrize("conf, key", [
    ({"data_path": "/etc", "dataset": "imagefolder"}, "data_path"),
    ({"data_path": "../outside", "dataset": "imagefolder"}, "data_path"),
    ({"distiller_schedule": "/etc/passwd"}, "distiller_schedule"),
    ({"artifacts": "/tmp/elsewhere"}, "artifacts"),
    ({"baseline": "/etc/baseline.pt"}, "baseline"),
    ({"spec_overrides": {"artifacts": "/tmp/elsewhere"}}, "artifacts"),
    ({"spec_overrides": {"baseline": {"checkpoint": "/x/y.pt"}}}, "baseline"),
    ({"spec_overrides": {"dataset": {"name": "imagefolder", "path": "/etc"}}}, "data_path"),
])
def test_paths_outside_the_configured_roots_are_refused(roots, conf, key):
    with pytest.raises(SpecError, match=rf"{key}: .* is outside the folders the deployment allows"):
        trial_conf.spec_from_conf(conf, "r")


def test_a_symlink_inside_a_root_is_judged_by_its_target(roots):
    os.symlink("/etc", roots / "data" / "link")
    with pytest.raises(SpecError, match="data_path: .* is outside"):
        trial_conf.spec_from_conf({"dataset": "imagefolder", "data_path": str(roots / "data" / "link")}, "r")
    (roots / "data" / "set").mkdir()
    spec = trial_conf.spec_from_conf({"dataset": "imagefolder", "data_path": "data/set"}, "r")  # relative: home
    assert spec.dataset.path == str(roots / "data" / "set")


def test_only_configured_results_dbs(roots, monkeypatch):
    with pytest.raises(SpecError, match="db: not a results DB the deployment allows"):
        trial_conf.spec_from_conf({"db": "postgresql://attacker@10.0.0.1/x"}, "r")
    with pytest.raises(SpecError, match="db: not a results DB"):
        trial_conf.spec_from_conf({"spec_overrides": {"db": f"sqlite:///{roots / 'other.db'}"}}, "r")
    monkeypatch.setenv("PRUNEFLOW_ALLOWED_DBS", f"sqlite:///{roots / 'other.db'}")
    assert trial_conf.spec_from_conf({"db": f"sqlite:///{roots / 'other.db'}"}, "r").db.endswith("other.db")
    assert trial_conf.spec_from_conf({}, "r").db == f"sqlite:///{roots / 'results.db'}"


def test_readme_conf_table_is_the_generated_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- conf-keys", 1)[1].split("-->", 1)[1].split("<!-- /conf-keys -->", 1)[0]
    assert block.strip() == trial_conf.markdown_table(trial_conf.conf_keys()), "run `pruneflow conf` into the README"


def test_model_names_are_the_registry():
    from pruneflow.models import list_models

    assert sorted(MODEL_NAMES) == list_models()
