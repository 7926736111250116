"""The pruneflow page in the Airflow UI: studies, trials, the Pareto plot and the reports.

A FastAPI app mounted by the API server at /pruneflow, with a link in the Airflow navigation.
Airflow does not authenticate plugin apps: every route here depends on Airflow's own `get_user`,
which accepts the UI's session cookie or an `Authorization: Bearer` token (401 otherwise).
Heavy work (plots, reports) is imported inside the handlers; nothing here imports torch.

Every path served or written lies inside the reports root: a study name must be an id
(:data:`pruneflow.constants.ID_PATTERN`), a report file a plain name, and both must resolve (symbolic
links followed) to the study's folder directly under the root; anything else is 404. A study's report
is rebuilt only when its trials changed since the last build (see :func:`pruneflow.report.report_source`).
"""

from __future__ import annotations

import html
import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

PREFIX = "/pruneflow"
STYLE = """<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}svg{max-width:100%;height:auto}</style>"""


def _db() -> str:
    from pruneflow.settings import results_db

    return results_db()


def _reports_root() -> Path:
    from pruneflow.settings import reports_root

    return reports_root()


# what the last build of a study's report was built from, beside the report
REPORT_STATE = "report_source.json"
# a file of a report: a plain name, no folder, not hidden (so never '.' or '..')
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@=+-]{0,199}")
_build_lock = threading.Lock()


def _not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def _study_dir(study: str) -> Path:
    """The study's report folder: <reports root>/<study>, resolved, or 404 when the name is not an id or
    the folder (a symbolic link, say) resolves anywhere but directly under the root."""
    from pruneflow.constants import ID_RE, is_id

    if not (is_id(study) and ID_RE.fullmatch(study)):
        raise _not_found(f"no study {study!r}")
    root = _reports_root().resolve()
    out = (root / study).resolve()
    if not out.is_relative_to(root) or out.parent != root:
        raise _not_found(f"no study {study!r}")
    return out


def _report_file(study: str, name: str) -> Path:
    out = _study_dir(study)
    missing = _not_found(f"no report file {name!r} for study {study!r}")
    if not _FILE_RE.fullmatch(name):
        raise missing
    path = (out / name).resolve()
    if path.parent != out or not path.is_file():
        raise missing
    return path


@contextmanager
def _building(root: Path):
    """One report build at a time: across the threads of this server, and its worker processes."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with _build_lock, FileLock(str(root / ".build.lock")):
        yield


def _current_summary(out: Path, source: dict) -> dict | None:
    """The summary of the report in `out` if it was built from `source`, else None."""
    try:
        if json.loads((out / REPORT_STATE).read_text()) != source or not (out / "report.html").is_file():
            return None
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def study_report(db: str, study: str, out: Path) -> tuple[dict, bool]:
    """The study's report summary, and whether it was (re)built now: the last report is kept while the
    study's trials are unchanged. Raises ValueError for an unknown study."""
    from pruneflow import report

    with _building(out.parent):
        source = report.report_source(db, study)  # before the build: a trial recorded during it is news next time
        summary = _current_summary(out, source)
        if summary is not None:
            return summary, False
        summary = report.write_report(db, study, out)
        tmp = out / f".{REPORT_STATE}.tmp"
        tmp.write_text(json.dumps(source, indent=2))
        os.replace(tmp, out / REPORT_STATE)
        return summary, True


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"{STYLE}</head><body>{body}</body></html>")


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def create_app() -> FastAPI:
    app = FastAPI(title="pruneflow", dependencies=[Depends(get_user)])

    @app.get("/", response_class=HTMLResponse)
    def index():
        from pruneflow.store import ResultsStore

        store = ResultsStore(_db())
        try:
            rows = store.list_trials()
        finally:
            store.close()
        studies: dict[str, list[dict]] = {}
        for r in rows:
            studies.setdefault(r.get("study") or "(no study)", []).append(r)
        study_rows = "".join(
            f"<tr><td><a href='studies/{html.escape(quote(s, safe=''))}'>{html.escape(s)}</a></td><td>{len(t)}</td>"
            f"<td>{sum(x['status'] == 'succeeded' for x in t)}</td><td>{sum(x['status'] == 'failed' for x in t)}</td>"
            f"<td>{sum(x['status'] == 'abandoned' for x in t)}</td></tr>"
            for s, t in sorted(studies.items()) if s != "(no study)")
        trial_rows = "".join(
            f"<tr><td>{html.escape(r['trial_id'])}</td><td>{html.escape(r.get('study') or '')}</td>"
            f"<td>{r['status']}</td><td>{_fmt(r.get('latency_median_ms'))}</td>"
            f"<td>{_fmt(r.get('top1_masked'), '.2f')}</td><td>{_fmt(r.get('top1_recalibrated'), '.2f')}</td>"
            f"<td>{_fmt(r.get('top1_final'), '.2f')}</td><td>{html.escape(r.get('top1_source') or '')}</td>"
            f"<td>{r.get('macs_after') or '-'}</td><td>{html.escape(r.get('reason') or '')}</td></tr>"
            for r in reversed(rows[-200:]))
        return _page("pruneflow", f"""<h1>pruneflow</h1>
<h2>Studies</h2><table><tr><th>study</th><th>trials</th><th>succeeded</th><th>failed</th><th>stopped early</th></tr>
{study_rows or '<tr><td colspan=5>no sweeps yet</td></tr>'}</table>
<h2>Trials (newest first)</h2><table><tr><th>trial</th><th>study</th><th>status</th><th>latency ms</th>
<th>Top-1 pruned</th><th>Top-1 recalibrated</th><th>Top-1 final</th><th>final is</th><th>MACs</th><th>reason</th></tr>
{trial_rows}</table>""")

    @app.get("/studies/{study}", response_class=HTMLResponse)
    def study_page(study: str):
        out = _study_dir(study)
        try:
            summary, _ = study_report(_db(), study, out)
        except ValueError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        svg = _report_file(study, "report.html").read_text()
        start = svg.index("<div class=\"pareto-plot\">")
        plot = svg[start:svg.index("</div>", start) + 6]
        best = "".join(f"<li>{html.escape(b['trial_id'])}: {b['latency_median_ms']:.3f} ms, "
                       f"Top-1 {b['top1_final']:.2f}%</li>" for b in summary["best"]) or "<li>none yet</li>"
        return _page(f"pruneflow: {study}", f"""<p><a href='../'>all studies</a></p>
<h1>Study {html.escape(study)}</h1><p>objective {summary['objective']}, {summary['trials']} trials
{summary['by_status']}</p><h2>Best</h2><ul>{best}</ul>
<h2>Pareto front</h2>{plot.replace('href="#trial-', 'href="report/report.html#trial-')}
<p><a href='report/report.html'>full report</a> · <a href='report/trials.csv'>trials.csv</a> ·
<a href='report/best_spec.yaml'>best_spec.yaml</a></p>""")

    @app.get("/studies/{study}/report/{name}")
    def report_file(study: str, name: str):
        return FileResponse(_report_file(study, name))

    @app.get("/api/trials")
    def trials(study: str | None = None):
        from pruneflow.store import ResultsStore

        store = ResultsStore(_db())
        try:
            return store.list_trials(study=study)
        finally:
            store.close()

    return app


class PruneflowPlugin(AirflowPlugin):
    name = "pruneflow"
    fastapi_apps = [{"app": create_app(), "url_prefix": PREFIX, "name": "pruneflow"}]
    external_views = [{"name": "Pruning results", "href": "pruneflow/", "destination": "nav", "url_route": "pruneflow"}]
