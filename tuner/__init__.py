"""llamahost tuner: probe a CPU host, search llama.cpp settings in isolated trials, prove and write the winner.

The public surface is small on purpose; the command line (``llamahost``) is the main entry point.
"""

from tuner.errors import UserError

__all__ = ["UserError", "__version__"]
__version__ = "0.1.0"
