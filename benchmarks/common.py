"""The benchmark scripts' shared helpers live in the package (``realm_jax/bench.py``, also used by
``realm-jax bench``); this module keeps ``import common`` working for the scripts here and adds
what only they need."""

import os

from realm_jax.bench import (copy_bandwidth, environment, environment_line, markdown_table,  # noqa: F401
                             time_call, write_json)


def results_path(out: str | None, stem: str, env: dict, suffix: str = "") -> str:
    """``out`` if given, else ``benchmarks/results/<stem>-<device><suffix>.json``."""
    if out:
        return out
    device = env["device"].replace(" ", "_")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{stem}-{device}{suffix}.json")
