"""Side-by-side HTTP benchmark: the project's `mnist serve` vs LitServe vs TorchServe 0.12, all on 127.0.0.1.

Run by run.sh (system python3, standard library only). Phases:
  sweep  each candidate setting of each peer (and diagnostic variants of the project) under
         ab -n N -c C on the 28x28 predict body, keep-alive off and on; the best peer settings are kept
  final  two rounds, servers one at a time, round 2 in reverse order: health, 28x28 predict, 320x240
         predict, each with keep-alive off and on
Every server is started in its own session (its PID is its process group), its PID is written to
PIDFILE for run.sh's trap, and it is stopped by that PID when its turn ends. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = os.environ.get("PROJECT", os.getcwd())  # the project root (run.sh exports it)
PROJECT_MNIST = f"{PROJECT}/.venv/bin/mnist"
PROJECT_PY = f"{PROJECT}/.venv/bin/python"
TICK = os.sysconf("SC_CLK_TCK")

A = None  # parsed args
PIDS: dict[int, str] = {}  # running servers: pid (= process group) -> name


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ CPU accounting

def _stat(pid: str) -> tuple[int, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rfind(")") + 2:].split()  # fields from 'state' on; utime/stime are fields 14/15 (index 11/12 here)
    return int(f[1]), int(f[11]) + int(f[12])  # ppid, utime+stime ticks


def tree_ticks(root: int) -> tuple[int, list[int]]:
    """CPU ticks used so far by root and all its live descendants, and their pids."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _stat(d)
            if s:
                procs[int(d)] = s
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    seen, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in procs and p not in seen:
            seen.append(p)
            todo.extend(kids.get(p, []))
    return sum(procs[p][1] for p in seen), seen


def system_busy_ticks() -> int:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def busy_cores(seconds: float) -> float:
    b0, t0 = system_busy_ticks(), time.time()
    time.sleep(seconds)
    return (system_busy_ticks() - b0) / TICK / (time.time() - t0)


def wait_quiet(max_wait: float, step: float, what: str, use_load: bool = True) -> dict:
    """Wait (in `step` second sleeps, at most `max_wait` s) until the machine is idle apart from us.

    Quiet = under A.quiet_cores busy over a 5 s sample and, with use_load (at the start; between our own
    servers the load average still carries our last test), a 1-minute load average under A.quiet_load.
    """
    start = time.time()
    while True:
        load1 = os.getloadavg()[0]
        busy = busy_cores(5)
        quiet = busy < A.quiet_cores and (load1 < A.quiet_load or not use_load)
        if quiet or time.time() - start + step > max_wait:
            state = {"waited_s": round(time.time() - start), "busy_cores": round(busy, 2), "load1": round(load1, 2),
                     "quiet": quiet}
            log(f"{what}: {'quiet' if quiet else 'NOT quiet, going on anyway'} {state}")
            return state
        log(f"{what}: busy {busy:.2f} cores, load1 {load1:.2f}; waiting {step:.0f} s")
        try:
            top = subprocess.run(["top", "-bn1", "-w", "160"], capture_output=True, text=True, timeout=10).stdout
            log("top:\n" + "\n".join(top.splitlines()[6:12]))
        except Exception:  # noqa: BLE001 - top is only a hint in the log
            pass
        time.sleep(step)


# ------------------------------------------------------------------------------------------------ servers

def free_port(start: int) -> int:
    """The first port from start on such that it and the next two (TorchServe's management and metrics) are free."""
    port = start
    while True:
        try:
            for q in range(port, port + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return port
        except OSError:
            port += 3


def start(cfg: dict, port: int) -> subprocess.Popen:
    name, kind, p = cfg["name"], cfg["kind"], cfg["params"]
    env = dict(os.environ, TMPDIR=str(A.scratch / "tmp"), PYTHONUNBUFFERED="1")
    logf = open(A.scratch / "logs" / f"server-{name}-{port}.log", "w")
    cwd = A.scratch / "tmp"
    if kind == "project":
        cmd = [PROJECT_MNIST, "serve", "--checkpoint", str(A.ckpt), "--port", str(port), *p.get("flags", ())]
        if p.get("pin"):  # CPU affinity: the whole server on core 0
            cmd = ["taskset", "-c", "0"] + cmd
    elif kind == "litserve":
        cmd = [str(A.scratch / "venv-litserve/bin/python"), str(HERE / "litserve_server.py"),
               "--state", str(A.scratch / "models/seed_cnn_state.pt"), "--port", str(port),
               "--workers", str(p["workers"]), "--max-batch", str(p["batch"]),
               "--batch-timeout", str(p["delay_ms"] / 1000), "--threads", str(p["threads"])]
        if p.get("fast_queue"):
            cmd.append("--fast-queue")
        if p.get("api_servers"):
            cmd += ["--api-servers", str(p["api_servers"])]
    elif kind == "torchserve":
        d = A.scratch / "ts" / name
        (d / "logs").mkdir(parents=True, exist_ok=True)
        models = {"mnist": {"1.0": {"defaultVersion": True, "marName": "mnist.mar", "minWorkers": p["workers"],
                                    "maxWorkers": p["workers"], "batchSize": p["batch"],
                                    "maxBatchDelay": p["delay_ms"], "responseTimeout": 120}}}
        (d / "config.properties").write_text("\n".join([
            f"inference_address=http://127.0.0.1:{port}",
            f"management_address=http://127.0.0.1:{port + 1}",
            f"metrics_address=http://127.0.0.1:{port + 2}",
            f"model_store={A.scratch / 'ts' / 'model_store'}",
            "load_models=mnist.mar",
            f"models={json.dumps(models)}",
            f"default_workers_per_model={p['workers']}",
            "disable_token_authorization=true",
            "disable_system_metrics=true",
            "async_logging=true",
            "job_queue_size=1000",
            f"vmargs=-Xmx1g -XX:+UseContainerSupport -Djava.io.tmpdir={A.scratch / 'tmp'}",
        ]) + "\n")
        env.update(LOG_LOCATION=str(d / "logs"), METRICS_LOCATION=str(d / "logs"),
                   PEER_TORCH_THREADS=str(p["threads"]),
                   PATH=f"{A.scratch / 'venv-torchserve/bin'}{os.pathsep}{env['PATH']}")
        cmd = [str(A.scratch / "venv-torchserve/bin/torchserve"), "--start", "--foreground", "--ncs",
               "--model-store", str(A.scratch / "ts" / "model_store"), "--ts-config", str(d / "config.properties"),
               "--disable-token-auth"]
        cwd = d
    else:
        raise ValueError(kind)
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    PIDS[proc.pid] = name
    with open(A.pidfile, "a") as f:
        f.write(f"{proc.pid}\n")
    log(f"started {name} pid {proc.pid} port {port}: {' '.join(cmd)}")
    return proc


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(pid: int, tree: list[int], sig: int) -> None:
    """Signal the process group led by pid, then each pid of its tree (in case one left the group)."""
    for target in [-pid] + tree:
        try:
            os.killpg(pid, sig) if target < 0 else os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group and every descendant, by PID; SIGKILL whatever is left after 15 s."""
    pid = proc.pid
    tree = tree_ticks(pid)[1]
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        kill_tree(pid, tree, sig)
        deadline = time.time() + grace
        while time.time() < deadline:
            proc.poll()
            if proc.returncode is not None and not any(_alive(p) for p in tree):
                break
            time.sleep(0.2)
        if proc.returncode is not None and not any(_alive(p) for p in tree):
            break
    PIDS.pop(pid, None)
    if A.pidfile.exists():
        left = [x for x in A.pidfile.read_text().split() if x != str(pid)]
        A.pidfile.write_text("".join(f"{x}\n" for x in left))
    log(f"stopped pid {pid} (rc {proc.returncode}; {len(tree)} processes in its tree)")


def endpoints(kind: str, port: int) -> tuple[str, str]:
    base = f"http://127.0.0.1:{port}"
    if kind == "torchserve":
        return f"{base}/predictions/mnist", f"{base}/ping"
    return f"{base}/predict", f"{base}/health"


def post(url: str, body: bytes, timeout: float = 10) -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": A.content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:200]
    except Exception as e:  # noqa: BLE001
        return 0, repr(e)[:200]


def wait_ready(proc: subprocess.Popen, kind: str, port: int, timeout: float = 180) -> float:
    predict, health = endpoints(kind, port)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    status, _ = post(predict, A.bodies["mnist28"])
                    if status == 200:
                        return time.time() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout} s")


def check(kind: str, port: int) -> dict:
    """One request per test image: the HTTP status and the predicted digit."""
    predict, _ = endpoints(kind, port)
    out = {}
    for name, body in A.bodies.items():
        status, j = post(predict, body)
        digit = j.get("digit") if isinstance(j, dict) else None
        out[name] = {"status": status, "digit": digit, "label": A.labels[name],
                     "ok": status == 200 and digit == A.labels[name]}
    return out


# ------------------------------------------------------------------------------------------------ load

BODY_OF = {"pred28": "mnist28", "pred320": "font320", "health": None}


def client_cpu(fn):
    """Run fn(); return its result and the CPU seconds its child processes (the load generator) used."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = fn()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime


def ab(label: str, url: str, keepalive: bool, body: str | None, n: int, c: int | None = None,
       timeout_s: int = 30) -> dict:
    """ApacheBench (HTTP/1.0): -k asks for keep-alive, which the server may ignore (then 'ka_reqs' is 0)."""
    csv = A.scratch / "logs" / f"ab-{label}.csv"
    cmd = ["ab", "-q", "-r", "-s", str(timeout_s), "-n", str(n), "-c", str(c or A.c), "-e", str(csv)]
    if keepalive:
        cmd.append("-k")
    if body:
        cmd += ["-p", str(A.scratch / "inputs" / f"{body}.body"), "-T", A.content_type]
    cmd.append(url)
    t0 = time.time()
    r, cpu = client_cpu(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=900))
    wall = time.time() - t0
    (A.scratch / "logs" / f"ab-{label}.txt").write_text(" ".join(cmd) + "\n" + r.stdout + r.stderr)

    def grab(pattern: str, cast=float, default=None):
        m = re.search(pattern, r.stdout)
        return cast(m.group(1)) if m else default

    pct = {}
    if csv.exists() and r.returncode == 0:
        for line in csv.read_text().splitlines()[1:]:
            k, v = line.split(",")
            pct[int(float(k))] = float(v)
    complete = grab(r"Complete requests:\s+(\d+)", int, 0)
    fails = (grab(r"Failed requests:\s+(\d+)", int, 0) + grab(r"Non-2xx responses:\s+(\d+)", int, 0)
             + (n - complete))
    return {"tool": "ab", "rc": r.returncode, "wall": wall, "requests": complete, "fails": fails,
            "ka_reqs": grab(r"Keep-Alive requests:\s+(\d+)", int, 0),
            "rps": grab(r"Requests per second:\s+([\d.]+)") if r.returncode == 0 else None,
            "p50": pct.get(50), "p99": pct.get(99), "client_cpu": cpu / wall,
            "err": (r.stderr.strip().splitlines() or [""])[-1][:160] if r.returncode else ""}


def wrk(label: str, url: str, body: str | None) -> dict:
    """wrk (HTTP/1.1, keep-alive): one thread, A.c connections, A.wrk_seconds seconds."""
    env = dict(os.environ, CTYPE=A.content_type, BODY=str(A.scratch / "inputs" / f"{body}.body") if body else "")
    cmd = ["wrk", "-t1", f"-c{A.c}", f"-d{A.wrk_seconds}s", "--timeout", "30s", "-s", str(HERE / "wrk.lua"), url]
    t0 = time.time()
    r, cpu = client_cpu(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300))
    wall = time.time() - t0
    (A.scratch / "logs" / f"wrk-{label}.txt").write_text(" ".join(cmd) + "\n" + r.stdout + r.stderr)
    m = re.search(r"^JSON (.*)$", r.stdout, re.M)
    if r.returncode or not m:
        return {"tool": "wrk", "rc": r.returncode, "wall": wall, "rps": None, "p50": None, "p99": None,
                "fails": None, "requests": 0, "client_cpu": cpu / wall, "err": (r.stderr or r.stdout)[-160:]}
    j = json.loads(m.group(1))
    return {"tool": "wrk", "rc": 0, "wall": wall, "requests": j["requests"],
            "rps": j["requests"] / (j["duration_us"] / 1e6), "p50": j["p50_us"] / 1000, "p99": j["p99_us"] / 1000,
            "fails": j["connect"] + j["read"] + j["write"] + j["status"] + j["timeout"],
            "client_cpu": cpu / wall, "err": ""}


def measure(proc, cfg: dict, port: int, test: str, tag: str, nka_ok: bool) -> dict:
    predict, health = endpoints(cfg["kind"], port)
    what, mode = test.split("/")
    url, body = (health if what == "health" else predict), BODY_OF[what]
    if mode == "nka" and not nka_ok:
        log(f"  {cfg['name']:>14} {test:<13} skipped: ab without keep-alive hangs on this server")
        return {"skipped": "n/a: hangs (server keeps the HTTP/1.0 connection open)"}
    s0, b0 = tree_ticks(proc.pid)[0], system_busy_ticks()
    label = f"{tag}-{cfg['name']}-{what}-{mode}"
    res = wrk(label, url, body) if mode == "wrk" else ab(label, url, mode == "ka", body, A.n)
    s1, b1 = tree_ticks(proc.pid)[0], system_busy_ticks()
    res["srv_cpu"] = (s1 - s0) / TICK / res["wall"]
    res["sys_cpu"] = (b1 - b0) / TICK / res["wall"]
    res["other_cpu"] = max(0.0, res["sys_cpu"] - res["srv_cpu"] - res["client_cpu"])
    log(f"  {cfg['name']:>14} {test:<13} rps {fmt(res['rps'])} p50 {fmt(res['p50'], 2)} p99 {fmt(res['p99'], 2)} "
        f"fails {res['fails']} reqs {res['requests']} ka-reqs {res.get('ka_reqs', '-')} srv {res['srv_cpu']:.2f} "
        f"client {res['client_cpu']:.2f} other {res['other_cpu']:.2f} cores {res['err']}")
    return res


def session(cfg: dict, tests: list[str], tag: str) -> dict:
    """Start one server, check its answers, warm it up, run the tests, check again, stop it."""
    out_quiet = wait_quiet(A.quiet_max_between, 30, f"before {cfg['name']}", use_load=False)
    port = free_port(A.port)
    A.port = port + 5
    proc = start(cfg, port)
    out = {"name": cfg["name"], "kind": cfg["kind"], "settings": cfg["label"], "tag": tag, "tests": {},
           "quiet_before": out_quiet}
    try:
        out["ready_s"] = round(wait_ready(proc, cfg["kind"], port), 1)
        out["check_before"] = check(cfg["kind"], port)
        predict, health = endpoints(cfg["kind"], port)
        # does ab without keep-alive finish here? (TorchServe keeps HTTP/1.0 connections open: ab then hangs)
        probe = ab(f"{tag}-{cfg['name']}-nka-probe", health, False, None, 20, c=2, timeout_s=5)
        nka_ok = out["nka_ok"] = probe["rc"] == 0 and probe["requests"] == 20
        if not nka_ok:
            log(f"{cfg['name']}: ab without keep-alive did not finish ({probe['err']}); those tests are skipped")
        ab(f"{tag}-{cfg['name']}-warmup", predict, not nka_ok, "mnist28", A.warmup)
        for test in tests:
            out["tests"][test] = measure(proc, cfg, port, test, tag, nka_ok)
        out["check_after"] = check(cfg["kind"], port)
        pids = tree_ticks(proc.pid)[1]
        out["procs"] = len(pids)
        out["rss_mb"] = round(sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) for p in pids
                                  if Path(f"/proc/{p}/statm").exists()) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    except Exception as e:  # noqa: BLE001 - a server that fails is a row in the table, not the end of the run
        out["error"] = repr(e)[:300]
        log(f"{cfg['name']} FAILED: {out['error']}")
    finally:
        stop(proc)
    return out


# ------------------------------------------------------------------------------------------------ settings

def configs() -> list[dict]:
    def ls(name, workers, batch, delay_ms, threads=1, fast_queue=False, api_servers=None):
        label = f"workers={workers} " + (f"batch={batch}/{delay_ms}ms" if batch > 1 else "no-batch") + \
                f" threads={threads}" + (" fast_queue" if fast_queue else "") + \
                (f" api_servers={api_servers}" if api_servers else "")
        return {"name": name, "kind": "litserve", "label": label, "candidate": True,
                "params": dict(workers=workers, batch=batch, delay_ms=delay_ms, threads=threads, fast_queue=fast_queue,
                               api_servers=api_servers)}

    def ts(name, workers, batch, delay_ms, threads=1):
        label = f"workers={workers} " + (f"batch={batch}/{delay_ms}ms" if batch > 1 else "no-batch") + f" threads={threads}"
        return {"name": name, "kind": "torchserve", "label": label, "candidate": True,
                "params": dict(workers=workers, batch=batch, delay_ms=delay_ms, threads=threads)}

    def pj(name, label, diag=True, **params):
        return {"name": name, "kind": "project", "label": label, "candidate": not diag, "diag": diag, "params": params}

    return [
        pj("project", "as shipped (defaults: 2 workers, onnxruntime, batch 16/2ms)", diag=False),
        pj("project-torch", "--backend torch (2 workers, batch 16/2ms)", diag=False, flags=["--backend", "torch"]),
        ls("ls-w1", 1, 1, 0), ls("ls-w2", 2, 1, 0), ls("ls-w1-b16", 1, 16, 5), ls("ls-w2-b8", 2, 8, 5),
        ls("ls-w1-b16-fq", 1, 16, 5, fast_queue=True), ls("ls-w1-b16-api2", 1, 16, 5, api_servers=2),
        ts("ts-w1", 1, 1, 0), ts("ts-w2", 2, 1, 0), ts("ts-w1-b16", 1, 16, 5), ts("ts-w2-b8", 2, 8, 5),
        pj("proj-w1", "diag: --workers 1", flags=["--workers", "1"]),
        pj("proj-nobatch", "diag: --max-batch 1", flags=["--max-batch", "1"]),
        pj("proj-wait5", "diag: --max-wait-ms 5", flags=["--max-wait-ms", "5"]),
        pj("proj-log", "diag: --access-log 1 (every request logged)", flags=["--access-log", "1"]),
    ]


# ------------------------------------------------------------------------------------------------ report

def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def correct_str(r: dict) -> str:
    parts = []
    for name, short in (("mnist28", "28px"), ("font320", "320px")):
        cs = [r[k][name] for k in ("check_before", "check_after") if r.get(k)]
        if not cs:
            parts.append(f"{short}:?")
        elif all(c["ok"] for c in cs):
            parts.append(f"{short}:ok")
        else:
            bad = next(c for c in cs if not c["ok"])
            parts.append(f"{short}:" + (f"WRONG({bad['digit']})" if bad["status"] == 200 else f"HTTP {bad['status']}"))
    return " ".join(parts)


TEST_NAMES = {"nka": "ab", "ka": "ab -k", "wrk": "wrk ka"}


def test_label(test: str, results: list[dict]) -> str:
    what, mode = test.split("/")
    label = f"{what} {TEST_NAMES[mode]}"
    if mode == "ka" and any(x.get("tool") == "ab" and not x.get("ka_reqs") for x in results):
        label += " (no ka)"
    return label


def table(final: list[dict], sweep: list[dict], quiet0: dict) -> str:
    head = ["phase", "server", "settings", "test", "rps", "r1/r2 rps", "p50 ms", "p99 ms", "fails", "srv CPU",
            "CPU ms/req", "cli CPU", "other", f"correct (28px={A.labels['mnist28']}, 320px={A.labels['font320']})"]
    rows = []

    def row(phase, r0, test, res, runs):
        ok = [x for x in res if not x.get("skipped") and x.get("rps") is not None]
        if not ok:
            why = next((x.get("skipped") or x.get("err") for x in res if x.get("skipped") or x.get("err")),
                       r0.get("error", "no result"))
            return [phase, r0["kind"], r0["settings"], test_label(test, res), "-", "", "-", "-", "-", "-", "-", "-", "-",
                    (why or "failed")[:58]]
        mean = lambda key: statistics.mean(x[key] for x in ok if x[key] is not None)  # noqa: E731
        return [phase, r0["kind"], r0["settings"], test_label(test, ok), fmt(mean("rps")),
                "/".join(fmt(x["rps"]) for x in ok) if len(ok) > 1 else "", fmt(mean("p50"), 1), fmt(mean("p99"), 1),
                str(sum(x["fails"] or 0 for x in ok)), fmt(mean("srv_cpu"), 2),
                fmt(statistics.mean(1000 * x["srv_cpu"] / x["rps"] for x in ok), 1), fmt(mean("client_cpu"), 2),
                fmt(max(x["other_cpu"] for x in ok), 2), " / ".join(sorted({correct_str(r) for r in runs}))]

    by_name: dict[str, list[dict]] = {}
    for r in final:
        by_name.setdefault(r["name"], []).append(r)
    for name, runs in by_name.items():
        for t in A.final_tests:
            rows.append(row("final", runs[0], t, [r["tests"][t] for r in runs if t in r["tests"]], runs))
    for r in sweep:
        tests = list(r["tests"]) or A.sweep_tests
        for t in tests:
            rows.append(row("sweep" + (" *" if r.get("best") else ""), r, t, [r["tests"].get(t, {})], [r]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    notes = [
        "",
        f"ab: ApacheBench (HTTP/1.0) -n {A.n} -c {A.c}; 'ab -k' asks for keep-alive, '(no ka)' = the server closed "
        f"every connection anyway. wrk ka: wrk -t1 -c{A.c} -d{A.wrk_seconds}s, HTTP/1.1 keep-alive. "
        f"Each server start: correctness check, a {A.warmup}-request warm-up, the tests, the check again.",
        "pred28 = POST multipart 28x28 MNIST PNG; pred320 = POST multipart 320x240 font PNG; health = trivial "
        "route (project and LitServe GET /health, TorchServe GET /ping). fails = failed + non-2xx + missing.",
        "CPU in cores (machine has 2): srv = the server's whole process tree, CPU ms/req = srv CPU seconds per "
        "request, cli = the load generator, other = the rest of the machine during the test (noise from other jobs).",
        "final = two rounds, one server at a time, round 2 in reverse order (r1/r2 = each round). sweep = pred28 "
        "only, one run each; '*' = settings kept. 'diag' = `mnist serve` with flags other than its defaults.",
        f"machine at start: {quiet0}",
    ]
    return "\n".join(out + notes)


# ------------------------------------------------------------------------------------------------ main

def main() -> None:
    global A
    p = argparse.ArgumentParser()
    p.add_argument("--scratch", type=Path, default=Path(os.environ.get("PEERS_DIR", "/tmp/serve-peers")))
    p.add_argument("--ckpt", type=Path, default=None)
    p.add_argument("--pidfile", type=Path, default=None)
    p.add_argument("-n", type=int, default=3000)
    p.add_argument("-c", type=int, default=16)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--wrk-seconds", type=int, default=8)
    p.add_argument("--port", type=int, default=18720)
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep; use --ls/--ts settings")
    p.add_argument("--ls", default="ls-w1", help="LitServe setting when there is no sweep")
    p.add_argument("--ts", default="ts-w1", help="TorchServe setting when there is no sweep")
    p.add_argument("--only", default="", help="comma-separated config names: run just these, sweep-style")
    p.add_argument("--no-diag", action="store_true", help="skip the project's diagnostic variants in the sweep")
    p.add_argument("--quiet-cores", type=float, default=0.3)
    p.add_argument("--quiet-load", type=float, default=1.0)
    p.add_argument("--quiet-max", type=float, default=1200, help="max seconds to wait for a quiet machine at start")
    p.add_argument("--quiet-max-between", type=float, default=300)
    A = p.parse_args()
    A.ckpt = A.ckpt or A.scratch / "run" / "model.pt"
    A.pidfile = A.pidfile or A.scratch / "server.pids"
    meta = json.loads((A.scratch / "prep.json").read_text())
    A.content_type = meta["content_type"]
    A.labels = {k: v["label"] for k, v in meta["inputs"].items()}
    A.bodies = {k: (A.scratch / "inputs" / f"{k}.body").read_bytes() for k in meta["inputs"]}
    A.final_tests = [f"{w}/{m}" for w in ("pred28", "pred320", "health") for m in ("nka", "ka", "wrk")]
    A.sweep_tests = sweep_tests = ["pred28/nka", "pred28/ka", "pred28/wrk"]
    (A.scratch / "tmp").mkdir(parents=True, exist_ok=True)
    (A.scratch / "results").mkdir(parents=True, exist_ok=True)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    cfgs = {c["name"]: c for c in configs()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    quiet0 = wait_quiet(A.quiet_max, 60, "start")
    sweep, final = [], []
    try:
        if A.only:
            for name in A.only.split(","):
                sweep.append(session(cfgs[name], sweep_tests, "only"))
            print(table([], sweep, quiet0))
            return
        best = {"litserve": cfgs[A.ls], "torchserve": cfgs[A.ts]}
        if not A.no_sweep:
            for c in cfgs.values():
                if c.get("diag") and A.no_diag:
                    continue
                sweep.append(session(c, sweep_tests, "sweep"))
            for kind in ("litserve", "torchserve"):
                # score: mean rps over the tests that ran on this server, with no failures allowed
                scored = []
                for r in sweep:
                    done = [x for x in r["tests"].values() if not x.get("skipped")]
                    if r["kind"] == kind and done and all(x["rps"] and x["fails"] == 0 for x in done):
                        scored.append((statistics.mean(x["rps"] for x in done), r["name"]))
                if scored:
                    best[kind] = cfgs[max(scored)[1]]
            for r in sweep:
                r["best"] = r["name"] in (best["litserve"]["name"], best["torchserve"]["name"])
            (A.scratch / "results" / f"sweep-{stamp}.json").write_text(json.dumps(sweep, indent=1))
        order = [cfgs["project"], cfgs["project-torch"], best["litserve"], best["torchserve"]]
        for rnd, seq in ((1, order), (2, order[::-1])):
            for c in seq:
                r = session(c, A.final_tests, f"r{rnd}")
                r["round"] = rnd
                final.append(r)
        final.sort(key=lambda r: [c["name"] for c in order].index(r["name"]))
        (A.scratch / "results" / f"final-{stamp}.json").write_text(json.dumps(final, indent=1))
        print(table(final, sweep, quiet0))
    finally:
        for pid in list(PIDS):
            log(f"cleanup: killing pid {pid} ({PIDS[pid]}) and its tree")
            kill_tree(pid, tree_ticks(pid)[1], signal.SIGKILL)


if __name__ == "__main__":
    main()
