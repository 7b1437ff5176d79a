"""A context manager counting XLA backend compilations (for the no-recompilation tests)."""

import jax


class CompileCounter:
    """Counts XLA backend compilations while active (``.count``)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        self.count = 0

        def listener(name, *_a, **_k):
            if name == self.EVENT:
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
