"""Bridges to other tools. Each module imports its tool lazily; the tools are optional."""
