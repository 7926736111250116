"""A real headless Chromium (Debian's, driven by Playwright; Playwright's own browsers are never
downloaded) logs in to the Airflow UI and opens the trigger form of prune_trial: the DAG's Params must
be on the form. The screenshot is kept in the test's folder and copied to
out/test-artifacts/ui_trigger_form.png for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from airflow_servers import DAG_ID, REPO, AirflowServers, airflow_servers  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("PRUNEFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACT = REPO / "out" / "test-artifacts" / "ui_trigger_form.png"


@pytest.fixture
def browser_context(tmp_path: Path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: run `bash scripts/system-deps.sh`")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1500})
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


def _label(dialog, title: str):
    """The form field labelled `title` (a required field's label ends in "*")."""
    return dialog.locator("label", has_text=re.compile(rf"^\s*{re.escape(title)}\s*\*?\s*$")).first


def _labels(dialog) -> set[str]:
    return {t.replace("*", "").strip() for t in dialog.locator("label").all_inner_texts()}


def _open(dialog, section: str) -> None:
    """Open one section of the trigger form's accordion (a click on an open one would close it)."""
    button = dialog.get_by_role("button", name=section, exact=True)
    if button.get_attribute("aria-expanded") != "true":
        button.click()


def test_ui_login_and_trigger_form_shows_the_params(airflow_servers: AirflowServers,  # noqa: F811
                                                    browser_context, tmp_path: Path):
    s = airflow_servers
    with s.client() as client:
        params = s.wait_for_dag(client)["params"]
    schemas = {name: p.get("schema") or {} for name, p in params.items()}
    titles = {name: sch.get("title") or name for name, sch in schemas.items()}
    sections: dict[str, list[str]] = {}
    for name, sch in schemas.items():
        sections.setdefault(sch.get("section") or "", []).append(name)

    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Not logged in: the UI sends us to SimpleAuthManager's login form.
    page.goto(f"{s.url}/dags/{DAG_ID}")
    page.locator("input[name=username]").fill("admin")
    page.locator("input[name=password]").fill(s.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{DAG_ID}**")

    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Trigger Dag - {DAG_ID}").wait_for()
    # The Params are grouped in sections, shown as an accordion with one section open at a time:
    # open each, and check that every Param of it is a field with its title.
    missing = []
    for section, names in sections.items():
        if section:
            _open(dialog, section)
        _label(dialog, titles[names[0]]).wait_for()
        labels = _labels(dialog)
        missing += [f"{n} ({titles[n]!r}, section {section!r})" for n in names if titles[n] not in labels]
    assert not missing, f"Params not on the trigger form: {missing}"

    # For the picture: the section with the sparsities and the criterion.
    pruning = schemas["sparsities"].get("section")
    if pruning:
        _open(dialog, pruning)
    _label(dialog, titles["sparsities"]).wait_for()
    _label(dialog, titles["criterion"]).wait_for()
    dialog.get_by_text(f"Trigger Dag - {DAG_ID}").scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let the accordion animation settle
    shot = tmp_path / "ui_trigger_form.png"
    page.screenshot(path=str(shot))
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
    assert not errors, errors
