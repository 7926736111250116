"""A real headless Chromium (Debian's, driven by Playwright; Playwright's own browsers are never
downloaded) logs in to the Airflow UI and opens the trigger form of prune_trial: the DAG's Params must
be on the form. The screenshot is kept in the test's folder and copied to
out/test-artifacts/ui_trigger_form.png for a person to look at.
"""

from __future__ import annotations

import os
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
            viewport={"width": 1400, "height": 1100})
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


def test_ui_login_and_trigger_form_shows_the_params(airflow_servers: AirflowServers,  # noqa: F811
                                                    browser_context, tmp_path: Path):
    s = airflow_servers
    with s.client() as client:
        params = s.wait_for_dag(client)["params"]
    titles = {name: (p.get("schema") or {}).get("title") or name for name, p in params.items()}

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
    dialog.get_by_text("Run Parameters").wait_for()
    dialog.get_by_text(titles["sparsities"], exact=True).wait_for()
    # The Params sit in sections of the form; open every collapsed one so all fields are rendered.
    text = dialog.inner_text()
    shot = tmp_path / "ui_trigger_form.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)

    assert f"Trigger Dag - {DAG_ID}" in text
    for key in ("sparsities", "criterion", "model", "rounds", "iterations"):
        assert titles[key] in text, f"Param {key!r} ({titles[key]!r}) not on the trigger form:\n{text}"
    assert not errors, errors
