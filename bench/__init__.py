"""Benchmarks: each script times twinray against a baseline it runs itself and saves JSON in bench/results/."""
