"""Step and scan benchmarks (issue "Make FSG fast"); same as ``fsg bench``.

    python benchmarks/bench.py [--json] [--steps 2] [--skip-mambapy]
"""
import sys

from fsg.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
