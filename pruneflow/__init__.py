"""pruneflow: find the fastest accurate pruned version of a CNN for a given device.

This package must stay importable without torch (the benchmark worker has none):
import heavy libraries inside the modules that need them, never here.
"""

__version__ = "0.1.0"
