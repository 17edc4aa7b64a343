"""llama.cpp's own ``llama-server``: built from the pinned source, checked, and run with a RunConfig."""
