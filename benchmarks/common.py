"""The benchmark scripts' shared helpers live in the package (``realm_jax/bench.py``, also used by
``realm-jax bench``); this module keeps ``import common`` working for the scripts here."""

from realm_jax.bench import (copy_bandwidth, environment, environment_line, markdown_table,  # noqa: F401
                             time_call, tree_bytes, write_json)
