"""Load generation and reporting for benchmarks (the seed of `sluice bench`)."""
