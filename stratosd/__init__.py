"""Stratos daemon package: version and the hookimpl marker for plugins. Imports nothing heavy."""

import pluggy

__version__ = "0.1.0"
PROJECT = "stratos"
hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

__all__ = ["PROJECT", "__version__", "hookimpl", "hookspec"]
