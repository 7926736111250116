"""What running rapid trials through Airflow costs, against running them in-process, and where it goes.

N rapid trials (ResNet-20 on digits 32x32, groups layer1..3 at sparsity 0.5, 0 fine-tuning epochs,
OpenVINO CPU benchmark of 3 rounds x 60 iterations) run twice in ONE run of this script:

(a) in-process: one ``python -m pruneflow.cli trial SPEC --json`` process per trial, one after the
    other (so each pays its own Python + torch import cost), with no Airflow server running;
(b) through Airflow: real servers (``pruneflow airflow up`` in a tmp home, LocalExecutor, SQLite
    metadata DB), all N ``prune_trial`` runs triggered at once by REST; as many run at once as the
    configuration allows.

A baseline is trained once into out/bench/ and given to every trial by path, so no trial trains one.
Reported: total wall of each mode, their ratio, trials/hour, per-trial latency (trigger -> run success)
of the Airflow runs, and per task where the time goes: scheduling (previous task's end -> queued),
queued -> start (executor + task process start) and start -> end (task process: DAG parse, imports,
the stage itself, XCom), against the stage's own in-process time (``run_trial``'s ``timings_s``).
CPU: the mode's own CPU seconds per trial (the trial subprocesses; or the Airflow servers and the task
processes they reaped) and the machine's busy CPU seconds over the phase (/proc/stat: the machine may be
shared, and the difference is what else ran).

    .venv/bin/python benchmarks/airflow_overhead.py [--trials 6] [--set SECTION.KEY=VALUE ...]
        [--code DIR] [--label TEXT] [--write] [--only airflow|inprocess]

``--versus SECTION.KEY=VALUE`` (repeatable) runs the Airflow mode a second time in the same run with
these overrides on top, and prints both side by side: per-task start->end medians, trials/hour, ratios
(e.g. ``--set pruneflow.preload= --versus pruneflow.preload=torch,...``: task start-up without and with
the preloading executor).

``--set`` overrides an airflow.cfg key for this run only (as AIRFLOW__SECTION__KEY in the servers'
environment); ``--code DIR`` runs another copy of the project (its pruneflow, dags, template) to
compare before/after in the same conditions. ``--write`` appends the printed output to
benchmarks/RESULTS.md. Everything else goes under out/bench/airflow_overhead/ (removed unless --keep).
Never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OUT, REPO, RESULTS, ensure_baseline, load_avg, machine_header, table  # noqa: E402

DAG_ID = "prune_trial"
# both paths of prune_trial in order (a rapid trial runs validate, prune_to_export, benchmark, record; a task
# that did not run is left out of the breakdown)
TASKS = ["validate", "ensure_baseline", "prune", "thinnify", "retrain", "export", "prune_to_export", "benchmark",
         "record"]
# in-process stage(s) (run_trial's timings_s) doing each task's work
INPROC = {"validate": (), "ensure_baseline": (), "prune": ("prepare", "prune"), "thinnify": ("thinnify",),
          "retrain": ("retrain",), "export": ("export",),
          "prune_to_export": ("prepare", "prune", "thinnify", "retrain", "export"),
          "benchmark": ("benchmark",), "record": ("record",)}
RESEARCH_PER_HOUR = 90
TARGET_PER_HOUR = 270


def cpu_busy_s() -> float:
    """System-wide busy CPU seconds since boot (all cores; /proc/stat minus idle and iowait)."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(vals[:8]) - vals[3] - vals[4]) / hz


def own_cpu_s(home: Path | None = None) -> float:
    """CPU seconds of this script's finished children (the in-process trials), or, given an Airflow home,
    of its server processes and everything they have reaped (task processes): what the mode itself costs,
    whatever else runs on the machine."""
    if home is None:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    from pruneflow import airflow_cli

    total = 0.0
    for p in airflow_cli.server_processes(airflow_cli.Home(home)):
        try:
            st = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in st[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def spec_dict(baseline: Path, root: Path, rounds: int, iterations: int) -> dict:
    """The in-process trial spec; the Airflow conf below resolves to the same spec."""
    return {
        "name": "bench-inprocess",
        "model": {"name": "resnet20"},
        "dataset": {"name": "digits", "image_size": 32},
        "baseline": {"checkpoint": str(baseline)},
        "pruning": {"criterion": "l1", "groups": [
            {"name": f"layer{i}", "patterns": [f"layer{i}.*.conv1"], "sparsity": 0.5} for i in (1, 2, 3)]},
        "finetune": {"epochs": 0},
        "benchmark": {"backend": "openvino", "device": "CPU", "threads": 1, "warmup": 20, "rounds": rounds,
                      "iterations": iterations},
        "artifacts": str(root / "trials"),
        "db": f"sqlite:///{root / 'results.db'}",
    }


def base_env(code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PRUNEFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("BENCH_EXTRA_PYTHONPATH")])])
    env["PRUNEFLOW_HOME"] = str(code)
    return env


# ------------------------------------------------------------------------------------------ in-process

def run_inprocess(code: Path, root: Path, baseline: Path, n: int, rounds: int, iterations: int, say) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec_dict(baseline, root, rounds, iterations), indent=2))
    env = base_env(code)
    walls, summaries = [], []
    load0, cpu0, own0, t0 = load_avg(), cpu_busy_s(), own_cpu_s(), time.monotonic()
    for i in range(n):
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", "trial", str(spec_path), "--json",
                               "--trial-id", f"inproc-{i}"], env=env, cwd=code, capture_output=True, text=True)
        walls.append(time.monotonic() - t)
        if proc.returncode != 0:
            raise RuntimeError(f"in-process trial {i} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        summaries.append(json.loads(proc.stdout))
        say(f"in-process trial {i}: {walls[-1]:.1f} s (stages {summaries[-1]['total_s']:.1f} s)")
    wall = time.monotonic() - t0
    return {"wall": wall, "walls": walls, "summaries": summaries, "cpu": cpu_busy_s() - cpu0,
            "own_cpu": own_cpu_s() - own0,
            "load_before": load0, "load_after": load_avg()}


# --------------------------------------------------------------------------------------------- Airflow

class Servers:
    def __init__(self, code: Path, root: Path, overrides: dict[str, str], executor: str = "local",
                 env: dict[str, str] | None = None):
        self.code, self.root, self.executor = code, root, executor
        self.home = root / "airflow-home"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = base_env(code)
        self.env.update(PRUNEFLOW_ARTIFACTS=str(root / "trials"), PRUNEFLOW_DB=f"sqlite:///{root / 'results.db'}",
                        PRUNEFLOW_BASELINES=str(OUT), PRUNEFLOW_REPORTS=str(root / "reports"))
        # PRUNEFLOW_BASELINES holds the shared baseline of out/bench/: a conf may name a checkpoint under it
        for key, value in overrides.items():
            section, name = key.split(".", 1)
            self.env[f"AIRFLOW__{section.upper()}__{name.upper()}"] = value
        self.env.update(env or {})

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pruneflow.cli", "airflow", *args, "--home", str(self.home)]
        return subprocess.run(cmd, env=self.env, cwd=self.code, capture_output=True, text=True, timeout=timeout)

    def up(self) -> float:
        t0 = time.monotonic()
        proc = self.cli("up", "--port", str(self.port), "--timeout", "280", "--executor", self.executor)
        if proc.returncode != 0:
            self.down()
            raise RuntimeError(f"airflow up failed:\n{proc.stdout}\n{proc.stderr}")
        return time.monotonic() - t0

    def down(self) -> None:
        self.cli("down", timeout=120)

    def unpause(self, c, *dag_ids: str, timeout: float = 180) -> None:
        """Wait until the dag-processor has parsed each DAG, then unpause it."""
        for dag_id in dag_ids:
            deadline = time.monotonic() + timeout
            while c.get(f"/api/v2/dags/{dag_id}/details").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dag_id} not parsed: {c.get('/api/v2/importErrors').text}")
                time.sleep(1)
            c.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def client(self):
        import httpx

        password = json.loads((self.home / "simple_auth_manager_passwords.json").read_text())["admin"]
        r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": password}, timeout=60)
        r.raise_for_status()
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {r.json()['access_token']}"})


def run_airflow(code: Path, root: Path, baseline: Path, n: int, rounds: int, iterations: int,
                overrides: dict[str, str], say, timeout: float) -> dict:
    srv = Servers(code, root, overrides)
    up_s = srv.up()
    say(f"airflow up: healthy after {up_s:.1f} s (home {srv.home})")
    try:
        with srv.client() as c:
            srv.unpause(c, DAG_ID)
            # Create the results DB's tables first: ResultsStore's create_all races when several trials'
            # first tasks open a fresh DB at once ("table pf_trials already exists").
            subprocess.run([sys.executable, "-c", "import sys; from pruneflow.store import ResultsStore; "
                            "ResultsStore(sys.argv[1]).close()", srv.env["PRUNEFLOW_DB"]],
                           env=srv.env, cwd=code, check=True)
            time.sleep(5)  # let start-up work (first parse, serialization) settle
            conf = {"name": "bench-airflow", "baseline": str(baseline), "rounds": rounds, "iterations": iterations,
                    "warmup": 20, "threads": 1, "epochs": 0}
            load0, cpu0, own0 = load_avg(), cpu_busy_s(), own_cpu_s(srv.home)
            trig: dict[str, float] = {}
            errors: list[str] = []
            for i in range(n):
                run_id = f"bench-{i}"
                trig[run_id] = time.time()
                body = {"dag_run_id": run_id, "logical_date": None, "conf": {**conf, "trial_id": f"af-{i}"}}
                for attempt in range(6):  # the SQLite metadata DB may be locked by the scheduler: 500
                    r = c.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json=body)
                    if r.status_code < 500 or c.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").status_code == 200:
                        break
                    errors.append(f"trigger {run_id}: {r.status_code} {r.text[:200]}")
                    time.sleep(0.5 * (attempt + 1))
                r.raise_for_status()
            runs: dict[str, dict] = {}
            deadline = time.monotonic() + timeout
            while len(runs) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"runs not finished after {timeout:.0f} s: {sorted(set(trig) - set(runs))}")
                time.sleep(1)
                r = c.get(f"/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 100})
                for run in r.json()["dag_runs"]:
                    if run["dag_run_id"] in trig and run["state"] in ("success", "failed"):
                        runs[run["dag_run_id"]] = run
            cpu, own = cpu_busy_s() - cpu0, own_cpu_s(srv.home) - own0
            load1 = load_avg()
            tis = {}
            for run_id in trig:
                r = c.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
                tis[run_id] = {ti["task_id"]: ti for ti in r.json()["task_instances"]}
    finally:
        srv.down()
    failed = [rid for rid, run in runs.items() if run["state"] != "success"]
    if failed:
        states = {rid: {t: ti["state"] for t, ti in tis[rid].items()} for rid in failed}
        raise RuntimeError(f"runs failed: {states} (logs under {srv.home / 'logs'}; use --keep)")
    first = min(trig.values())
    last = max(ts(run["end_date"]) for run in runs.values())
    return {"up_s": up_s, "wall": last - first, "trig": trig, "runs": runs, "tis": tis, "cpu": cpu, "own_cpu": own,
            "errors": errors,
            "load_before": load0, "load_after": load1, "home": srv.home}


# ------------------------------------------------------------------------------------------- analysis

def med(vals: list[float]) -> str:
    return f"{statistics.median(vals):.2f}" if vals else "-"


def breakdown(af: dict, ip: dict | None) -> tuple[str, dict]:
    n = len(af["runs"])
    rows, tot = [], {"sched": 0.0, "queue": 0.0, "run": 0.0, "inproc": 0.0}
    per_task: dict[str, dict[str, list[float]]] = {t: {"sched": [], "queue": [], "run": []} for t in TASKS}
    tail = []
    for run_id, tis in af["tis"].items():
        prev_end = af["trig"][run_id]
        for task in TASKS:
            ti = tis[task]
            q, s, e = ts(ti["queued_when"]), ts(ti["start_date"]), ts(ti["end_date"])
            if q is None or s is None or e is None:
                continue
            per_task[task]["sched"].append(q - prev_end)
            per_task[task]["queue"].append(s - q)
            per_task[task]["run"].append(e - s)
            prev_end = e
        tail.append(ts(af["runs"][run_id]["end_date"]) - prev_end)
    inproc_mean: dict[str, float] = {}
    if ip:
        for task, stages in INPROC.items():
            inproc_mean[task] = statistics.mean(sum(s["timings_s"].get(k, 0.0) for k in stages)
                                                for s in ip["summaries"])
    for task in TASKS:
        d = per_task[task]
        if not d["run"]:  # not on the path these trials took
            continue
        s_sum, q_sum, r_sum = sum(d["sched"]), sum(d["queue"]), sum(d["run"])
        ipm = inproc_mean.get(task)
        tot["sched"] += s_sum
        tot["queue"] += q_sum
        tot["run"] += r_sum
        tot["inproc"] += (ipm or 0.0) * n
        rows.append([task, f"{s_sum:.1f}", f"{q_sum:.1f}", f"{r_sum:.1f}", med(d["run"]),
                     f"{ipm * n:.1f}" if ipm is not None else "-",
                     f"{(r_sum - ipm * n) / n:.2f}" if ipm is not None else "-"])
    rows.append(["(record end -> run success)", f"{sum(tail):.1f}", "", "", med(tail), "", ""])
    rows.append(["total", f"{tot['sched'] + sum(tail):.1f}", f"{tot['queue']:.1f}", f"{tot['run']:.1f}", "",
                 f"{tot['inproc']:.1f}", f"{(tot['run'] - tot['inproc']) / n:.2f}"])
    text = table(["task", "sched s (sum)", "queued->start s (sum)", "start->end s (sum)", "start->end median",
                  "in-process s (sum)", "run overhead s/trial"], rows)
    return text, {"per_task": per_task, "tot": tot, "tail": tail}


def concurrency(af: dict) -> tuple[float, int]:
    """Mean and max number of task instances running at once over the Airflow phase."""
    events = []
    for tis in af["tis"].values():
        for ti in tis.values():
            s, e = ts(ti["start_date"]), ts(ti["end_date"])
            if s is not None and e is not None:
                events += [(s, 1), (e, -1)]
    events.sort()
    cur = peak = 0
    area, last = 0.0, events[0][0] if events else 0.0
    for t, d in events:
        area += cur * (t - last)
        last = t
        cur += d
        peak = max(peak, cur)
    return area / af["wall"] if af["wall"] else 0.0, peak


def report(args, header: str, ip: dict | None, af: dict | None) -> str:
    n = args.trials
    out = [header, f"trials:   {n} rapid trials per mode (ResNet-20 digits 32x32, 0 epochs, benchmark "
                   f"{args.rounds} x {args.iterations} it.); label: {args.label or '-'}"]
    if args.set:
        out.append(f"airflow.cfg overrides: {' '.join(args.set)}")
    if args.code != REPO:
        out.append(f"code: {args.code}")
    rows = []
    if ip:
        rows.append(["in-process (sequential `pruneflow trial`)", f"{ip['wall']:.1f}", f"{ip['wall'] / n:.2f}",
                     f"{n / ip['wall'] * 3600:.0f}", f"{ip['own_cpu'] / n:.1f}", f"{ip['cpu']:.0f}", ip["load_before"], ip["load_after"]])
    if af:
        rows.append([f"Airflow ({n} runs triggered at once)", f"{af['wall']:.1f}", f"{af['wall'] / n:.2f}",
                     f"{n / af['wall'] * 3600:.0f}", f"{af['own_cpu'] / n:.1f}", f"{af['cpu']:.0f}", af["load_before"], af["load_after"]])
    out += ["", table(["mode", "wall s", "wall s/trial", "trials/hour", "own CPU s/trial", "machine busy CPU s", "load before",
                       "load after"],
                      rows)]
    if ip and af:
        out.append(f"Airflow / in-process wall: {af['wall'] / ip['wall']:.2f}x; target >= {TARGET_PER_HOUR}/hour "
                   f"(<= {3600 / TARGET_PER_HOUR:.1f} s/trial): {'MET' if n / af['wall'] * 3600 >= TARGET_PER_HOUR else 'not met'}; "
                   f"research pipeline ~{RESEARCH_PER_HOUR}/hour")
    if ip:
        imp = [w - s["total_s"] for w, s in zip(ip["walls"], ip["summaries"], strict=True)]
        out.append(f"in-process per trial: wall median {med(ip['walls'])} s, of which stages (run_trial) "
                   f"{med([s['total_s'] for s in ip['summaries']])} s and process start + imports + spec load "
                   f"{med(imp)} s")
    if af:
        lat = [ts(af["runs"][r]["end_date"]) - af["trig"][r] for r in af["runs"]]
        mean_c, peak = concurrency(af)
        out.append(f"Airflow per-trial latency trigger -> success: median {med(lat)} s, min {min(lat):.2f} s, "
                   f"max {max(lat):.2f} s; tasks running at once: mean {mean_c:.2f}, max {peak}; "
                   f"servers up in {af['up_s']:.1f} s (not counted)")
        if af["errors"]:
            out.append(f"REST errors while triggering (retried): {len(af['errors'])}, e.g. {af['errors'][0]}")
        text, _ = breakdown(af, ip)
        out += ["", "Where the Airflow time goes, summed over the trials (sched = previous task's end, or the "
                    "trigger, -> queued;", "queued->start = executor pick-up + task process start; start->end = "
                    "task process incl. DAG parse, imports, XCom):", "", text]
    return "\n".join(out)


def side_by_side(args, a: dict, b: dict) -> str:
    """The two Airflow phases of one run (A: --set only; B: --set plus --versus), per task and in all."""
    _, da = breakdown(a, None)
    _, db = breakdown(b, None)
    n = args.trials
    rows = []
    for task in TASKS:
        ra, rb = da["per_task"][task]["run"], db["per_task"][task]["run"]
        if not ra and not rb:
            continue
        ratio = statistics.median(rb) / statistics.median(ra) if ra and rb and statistics.median(ra) else None
        rows.append([task, med(ra), med(rb), f"{ratio:.2f}" if ratio is not None else "-"])
    rows.append(["all tasks, sum over trials", f"{da['tot']['run']:.1f}", f"{db['tot']['run']:.1f}",
                 f"{db['tot']['run'] / da['tot']['run']:.2f}"])
    rows.append(["wall of the phase", f"{a['wall']:.1f}", f"{b['wall']:.1f}", f"{b['wall'] / a['wall']:.2f}"])
    rows.append(["trials/hour", f"{n / a['wall'] * 3600:.0f}", f"{n / b['wall'] * 3600:.0f}",
                 f"{a['wall'] / b['wall']:.2f}"])
    return "\n".join([f"Side by side, one run: A = {' '.join(args.set) or 'defaults'}; B = A + {' '.join(args.versus)}",
                      "(start->end per task: median s over the trials; ratio B/A, trials/hour B/A)", "",
                      table(["task", "A s", "B s", "B/A"], rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="airflow.cfg override for this run (repeatable)")
    p.add_argument("--versus", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="run the Airflow mode again with these overrides on top, side by side (repeatable)")
    p.add_argument("--code", type=Path, default=REPO, help="project copy to run (default: this checkout)")
    p.add_argument("--label", default="", help="name of this configuration in the output")
    p.add_argument("--only", choices=["airflow", "inprocess"])
    p.add_argument("--write", action="store_true", help=f"append the output to {RESULTS.relative_to(REPO)}")
    p.add_argument("--keep", action="store_true", help="keep the tmp folder (Airflow home, task logs)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the Airflow runs")
    p.add_argument("--summary", type=Path, help="append one JSON line of the headline numbers to this file")
    args = p.parse_args(argv)
    args.code = args.code.resolve()
    overrides = dict(kv.split("=", 1) for kv in args.set)

    header = machine_header("Airflow overhead of rapid trials" + (f" ({args.label})" if args.label else ""), argv)

    def say(msg: str) -> None:
        print(f"[{datetime.now().strftime('%H:%M:%S')} load {load_avg()}] {msg}", file=sys.stderr, flush=True)

    baseline = ensure_baseline(3, progress=say)
    root = OUT / "airflow_overhead" / datetime.now().strftime("%Y%m%d-%H%M%S")
    ip = af = af_b = None
    ok = False
    try:
        if args.only != "airflow":
            ip = run_inprocess(args.code, root / "inprocess", baseline, args.trials, args.rounds, args.iterations, say)
        if args.only != "inprocess":
            af = run_airflow(args.code, root / "airflow", baseline, args.trials, args.rounds, args.iterations,
                             overrides, say, args.timeout)
        if args.versus:
            versus = {**overrides, **dict(kv.split("=", 1) for kv in args.versus)}
            af_b = run_airflow(args.code, root / "airflow-versus", baseline, args.trials, args.rounds,
                               args.iterations, versus, say, args.timeout)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            say(f"failed: kept {root} for its logs")
    text = report(args, header, ip, af)
    if args.versus and af:
        text += "\n\n" + side_by_side(args, af, af_b)
    print(text)
    if args.summary:
        line = {"label": args.label, "set": args.set, "code": str(args.code), "n": args.trials,
                "date": datetime.now().isoformat(timespec="seconds")}
        for key, m in (("inprocess", ip), ("airflow", af)):
            if m:
                line[key] = {"wall": round(m["wall"], 1), "own_cpu_per_trial": round(m["own_cpu"] / args.trials, 2),
                             "busy_cpu": round(m["cpu"]), "load_before": m["load_before"], "load_after": m["load_after"]}
        with open(args.summary, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    if args.write:
        with open(RESULTS, "a") as fh:  # append only: other sections of the file are someone else's
            title, body = text.split("\n", 1)
            fh.write(f"\n#{title}\n\n```text\n{body}\n```\n")
        say(f"appended to {RESULTS}")
    if af and args.keep:
        say(f"kept {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
