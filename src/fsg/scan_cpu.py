"""Compatibility name: the CPU C-kernel backend moved to :mod:`fsg.ssm.cpu`.

``fsg.scan_cpu`` *is* that module (the same object, registered under both names), so old
imports (``from fsg import scan_cpu``, ``from fsg.scan_cpu import selective_scan_fused``) and
monkeypatches of its attributes keep working. New code should import :mod:`fsg.ssm.cpu`.
"""

import sys

from .ssm import cpu as _cpu

sys.modules[__name__] = _cpu
