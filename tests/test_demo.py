"""`make demo`'s main job, examples/guard_demo.py: three real `caffe train` runs behave as it says."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_passes(caffe_bin):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "guard_demo.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo OK" in result.stdout
