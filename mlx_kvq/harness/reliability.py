"""mlx_kvq.reliability: run the assistant's bounded fault harnesses and
print their figures.

    mlx_kvq.reliability                      every section, a few rounds each
    mlx_kvq.reliability --rounds 12 --examples 300 --only kill,fuzz

A report is a list of sections, (name, function(args) -> rows); a row is a
dict printed as one table line, with "ok" saying whether it passed. The
harnesses are in faults.py (kill rounds), pressure.py (slow clients, memory
pressure) and fuzz_http.py (HTTP API fuzzing), each running the embedded
model in a subprocess on a temporary data dir, and mlx_kvq.harness.fuzz (caches,
specs and file loaders, in this process). Sections that need a package of the
test extra (Hypothesis) say so before anything runs if it is missing. Exits 1
if a row is not ok.
"""

import argparse
import tempfile
from pathlib import Path

from mlx_kvq.commands.cli_types import nonneg_int, positive_int

from . import faults, fuzz_http, pressure
from .extras import need


def kill_section(args, tmp: Path) -> list:
    r = faults.kill_rounds(tmp / "kill" / "data", args.rounds, args.seed,
                           log_file=tmp / "kill.log")
    hit = ", ".join(f"{k} {v}" for k, v in sorted(r["hit"].items()))
    return [{"rounds": r["rounds"], "survived": r["survived"],
             "answered turns": r["answered_turns"], "turns lost": r["turns_lost"],
             "caches rebuilt": r["rebuilt"],
             "temp files left": r["temp_files_after_restart"], "moments hit": hit,
             "ok": r["survived"] == r["rounds"] and not r["turns_lost"]
             and not r["problems"]}]


def _server(tmp: Path, name: str) -> faults.Assistant:
    return faults.Assistant(tmp / name / "data", "--max-tokens", "4", "--read-timeout", "3",
                            "--write-timeout", "20", "--max-connections", "400",
                            log_file=tmp / f"{name}.log")


def fuzz_section(args, tmp: Path) -> list:
    server = _server(tmp, "fuzz")
    try:
        rows = fuzz_http.run(server, args.examples, args.seed)
    finally:
        server.stop()
    return [{"target": r["target"], "examples": r["examples"], "failures": r["failures"],
             "first failure": r["first"] or "", "ok": not r["failures"]} for r in rows]


def runtime_fuzz_section(args, tmp: Path) -> list:
    from . import fuzz

    rows = fuzz.run(args.examples, args.seed)
    return [{"target": r["target"], "examples": r["examples"], "failures": len(r["failures"]),
             "first failure": r["failures"][0].splitlines()[0] if r["failures"] else "",
             "ok": not r["failures"]} for r in rows]


def slow_section(args, tmp: Path) -> list:
    server = _server(tmp, "slow")
    try:
        r = pressure.slow_clients(server, half_open=50, slow=3, stream_tokens=400, extra=5,
                                settle=15)
        h = pressure.half_requests(server, count=300, settle=15)
    finally:
        server.stop()
    stopped = (r["leaver_generated"] or 0) < r["stream_tokens"] and \
        (r["quiet_generated"] or 0) < r["stream_tokens"]
    return [{"half-open": 50, "slow-byte": 3, "connect s": f"{r['connect_s']:.2f}",
             "threads held": r["threads_held"], "good request": r["good_status"],
             "idle latency s": f"{r['idle_latency_s']:.2f}",
             "good latency s": f"{r['good_latency_s']:.2f}",
             "refused 503": f"{r['refused']}/5", "released": f"{r['released']}/{r['held']}",
             "threads after": r["threads_after"],
             "left mid-reply: tokens": f"{r['leaver_generated']}, {r['quiet_generated']} "
                                       f"of {r['stream_tokens']}",
             "ok": r["good_status"] == 200 and r["refused"] == 5
             and r["released"] == r["held"] and r["threads_after"] <= 0 and stopped},
            {"half-open": 300, "connect s": f"{h['connect_s']:.2f}",
             "threads held": h["threads_held"], "good request": h["good_status"],
             "good latency s": f"{h['good_latency_s']:.2f}",
             "released": f"{h['closed']}/300 ({h['answered_408']} with 408)",
             "ok": h["good_status"] == 200 and h["threads_held"] <= 0
             and h["closed"] == 300}]


def memory_section(args, tmp: Path) -> list:
    r = pressure.memory_pressure(tmp / "memory" / "data", requests=args.rounds * 4,
                               seed=args.seed, log_file=tmp / "memory.log")
    mib = 1 << 20
    return [{"requests": r["requests"], "served": r["served"],
             "refused (budget)": r["refused_budget"], "refused (busy)": r["refused_busy"],
             "peak MiB": f"{r['peak'] / mib:.1f}", "budget MiB": f"{r['budget'] / mib:.1f}",
             "process peak RSS MiB": f"{r['peak_rss'] / mib:.1f}",
             "problems": len(r["problems"]),
             "ok": not r["over_budget"] and not r["problems"] and r["alive"]
             and not r["tracebacks"]}]


# (name, title, function, test-only packages it needs)
SECTIONS = [
    ("kill", "SIGKILL at aimed moments, then restart", kill_section, ()),
    ("fuzz", "HTTP API fuzzing (Hypothesis)", fuzz_section, ("hypothesis",)),
    ("runtime-fuzz", "caches, specs and file loaders fuzzing (Hypothesis, mlx_kvq.harness.fuzz)",
     runtime_fuzz_section, ("hypothesis",)),
    ("slow", "slow and hostile clients around a good request", slow_section, ()),
    ("memory", "memory pressure: --memory just above the weights", memory_section, ()),
]


def table(rows: list) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def setup_arg_parser():
    p = argparse.ArgumentParser(
        description="Run mlx_kvq.assistant's fault harnesses (kill rounds, HTTP fuzzing, "
        "slow clients, memory pressure) and the runtime's fuzz targets (caches, specs, "
        "file loaders), and print their figures.")
    p.add_argument("--rounds", type=positive_int, default=4,
                   help="Kill rounds (memory pressure: 4 requests per round)")
    p.add_argument("--examples", type=positive_int, default=100,
                   help="Fuzz examples per target")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--only", default=None,
                   help=f"Comma-separated sections ({', '.join(s[0] for s in SECTIONS)})")
    p.add_argument("--data-dir", default=None,
                   help="Where the servers keep their data and logs (default: a "
                   "temporary folder, removed afterwards)")
    return p


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    names = [s[0] for s in SECTIONS]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"no section {', '.join(unknown)}; sections are {', '.join(names)}")
    try:  # before any section runs
        for name, _, _, packages in SECTIONS:
            for package in packages if name in only else ():
                need(package, f"the {name} section")
    except ImportError as e:
        parser.error(f"{e} (or leave the section out: --only)")
    ok = True
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.data_dir or scratch)
        for name, title, section, _ in SECTIONS:
            if name not in only:
                continue
            rows = section(args, tmp)
            ok &= all(r.get("ok", True) for r in rows)
            print(f"\n== {title} ==\n{table(rows)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
