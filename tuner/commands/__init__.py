"""Subcommands of ``llamahost``; each module exposes ``register(subparsers)``."""
