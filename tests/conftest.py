import os

import pytest

# Tests compare float32 results to float64 numpy oracles: keep XLA's CPU
# matmuls at full float32 precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every module's compiled programs when it ends. One pytest process compiles
    hundreds of XLA programs, and the CPU JIT keeps each one's code mapped: a full run
    crashed in XLA's compiler (a segfault, 2026-11-24, before commit a73b79d) once enough had
    piled up, as the speculative benchmark ran out of memory mappings."""
    yield
    import jax

    jax.clear_caches()
