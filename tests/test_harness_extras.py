"""The harnesses start without the `test` extra and name what is missing: a
package of the extra is hidden (None in sys.modules, as if not installed) in a
fresh interpreter, and the harnesses that need it say which package and how
to install it, while the others import and start."""

import subprocess
import sys

INSTALL = "pip install 'mlx-kvq[test]'"


def run_without(package: str, code: str) -> subprocess.CompletedProcess:
    script = f"import sys\nsys.modules[{package!r}] = None\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)


def test_without_hypothesis_the_fuzz_harnesses_say_what_to_install():
    r = run_without("hypothesis", """
from mlx_kvq.harness import bench_serve, faults, fuzz_http, pressure, reliability
from mlx_kvq.harness.extras import MissingExtra
try:
    from mlx_kvq.harness import fuzz
except MissingExtra as e:
    print("IMPORT:", e)
try:
    fuzz_http.strategies([])
except MissingExtra as e:
    print("HTTP:", e)
reliability.main(["--only", "runtime-fuzz", "--examples", "1"])
""")
    assert r.returncode == 2, r.stderr  # argparse's error exit, before any section ran
    lines = r.stdout.splitlines()
    for tag in ("IMPORT:", "HTTP:"):
        (line,) = [x for x in lines if x.startswith(tag)]
        assert "'hypothesis'" in line and INSTALL in line, line
    err = r.stderr.strip().splitlines()[-1]
    assert "runtime-fuzz section needs the package 'hypothesis'" in err and INSTALL in err
    assert "Traceback" not in r.stderr


def test_without_openai_the_client_says_what_to_install():
    r = run_without("openai", """
import types
from mlx_kvq.harness import bench_serve, faults, reliability
faults.Assistant.client(types.SimpleNamespace(url="http://127.0.0.1:9/"))
""")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("mlx_kvq.harness.extras.MissingExtra:"), err
    assert "'openai'" in err and INSTALL in err, err


def test_bench_serve_reports_the_median_of_the_alternating_rounds():
    from mlx_kvq.harness import bench_serve

    runs = [bench_serve.Run("ours", [10.0, 12.0, 9.0], 40.0, [64, 64], ["x", "y"]),
            bench_serve.Run("peer", [10.0, 10.0, 10.0], 38.0, [64, 64], ["x", "z"])]
    text = bench_serve.format_runs(runs, 2)
    assert "time 1.00x, median of the rounds' 1.00 1.20 0.90 (goal <= 1.0x)" in text, text
    assert "ours" in text and " 10.0 (10.0 12.0 9.0)" in text, text
    assert "one-by-one / together 4.00x" in text, text
    assert "replies identical to mlx_lm.server's: 1/2" in text, text
