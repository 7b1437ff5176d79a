"""Subcommands of ``realm-jax`` (see ``realm_jax/cli.py``)."""
