"""Benchmarks behind `make bench`: each prints a table, compares against peers measured
in the same run, and saves Markdown and PNG results under bench_results/."""
