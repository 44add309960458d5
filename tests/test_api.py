"""The package namespace: every ``fsg.<name>`` the README uses works after a plain ``import fsg``."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_name_the_readme_uses_resolves_after_import_fsg():
    names = sorted(set(re.findall(r"\bfsg\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", (ROOT / "README.md").read_text())))
    assert "fsg.data.DataLoader" in names and "fsg.grid.run_grid" in names
    code = ("import functools, sys\nimport fsg\nbad = []\nfor n in sys.argv[1:]:\n"
            "    try:\n        functools.reduce(getattr, n.split('.')[1:], fsg)\n"
            "    except AttributeError:\n        bad.append(n)\nprint(' '.join(bad))")
    # a fresh interpreter: no other test has imported the submodules
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == []
