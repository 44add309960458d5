"""The package namespace: every ``fsg.<name>`` the README uses works after a plain ``import fsg``."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_name_the_readme_uses_resolves_after_import_fsg():
    names = sorted(set(re.findall(r"\bfsg\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", (ROOT / "README.md").read_text())))
    assert "fsg.data.DataLoader" in names and "fsg.train.grid.run_grid" in names
    code = ("import functools, sys\nimport fsg\nbad = []\nfor n in sys.argv[1:]:\n"
            "    try:\n        functools.reduce(getattr, n.split('.')[1:], fsg)\n"
            "    except AttributeError:\n        bad.append(n)\nprint(' '.join(bad))")
    # a fresh interpreter: no other test has imported the submodules
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == []


def test_ci_runs_the_readme_test_set_up_command():
    """README: `.ci/run` runs the "Run the tests" command (same install, same test command) and a short demo."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Run the tests**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    steps = [s.strip() for s in block.strip().split("&&")]
    install = next(s for s in steps if s.startswith("pip install"))
    test = next(s for s in steps if "pytest" in s)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert install in [line.replace(" -q ", " ", 1) for line in ci if line.startswith("pip install")]
    assert test in ci
    assert "python3 -m venv" in " ".join(ci) and steps[0].startswith("python3 -m venv")
    demo = next(line for line in ci if line.startswith("fsg demo"))
    assert f"`{demo}`" in readme and "CI (`.ci/run`) runs this test set-up command" in readme
