"""Subcommands of the ``lsaq`` CLI: each module defines ``register(subparsers)`` and imports heavy code lazily."""
