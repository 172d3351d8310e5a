"""`make demo`'s main job, examples/demo.py, end to end: four broken trainings through the
real `caffe` binary, then lint, scan, diagnose, harden and safe-layers train on each."""

import subprocess
import sys
from support.paths import ROOT


def test_the_demo_passes(caffe_bin, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out",
                             str(tmp_path / "demo")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "demo OK" in result.stdout
    report = result.stdout[result.stdout.index("report: one line per scenario"):]
    lines = {line.split()[0]: line for line in report.splitlines()[2:6]}
    # What each scenario is caught by, and that the protected run trains.
    assert "diagnose SL802" in lines["high_lr"] and "watch" in lines["high_lr"]
    assert "lint SL201" in lines["pooling"]
    assert "lint SL104" in lines["poly"] and "diagnose SL812" in lines["poly"]
    assert "scan SL901" in lines["poisoned"] and "diagnose SL803" in lines["poisoned"]
    for line in lines.values():
        accuracy = float(line.split("protected: ")[1].split("accuracy ")[1].split(";")[0])
        assert accuracy > 0.9, line
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10000
