import os

# Tests compare float32 results to float64 numpy oracles: keep XLA's CPU
# matmuls at full float32 precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
