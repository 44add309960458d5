"""The ``fsg`` command line: argument parsing and one handler per verb, over :mod:`fsg.train`,
:mod:`fsg.io` and the method library. ``fsg <verb> --help`` documents each verb."""

from fsg.cli.app import main

__all__ = ["main"]
