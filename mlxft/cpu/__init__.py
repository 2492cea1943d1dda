"""CPU set-up done once per process: OpenBLAS behind MLX (blas) and glibc's allocator thresholds
(malloc)."""
