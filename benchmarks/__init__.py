"""Benchmarks of fedlora runs (not shipped in the wheel).

A regular package on purpose: opacus installs a top-level ``benchmarks`` package into
site-packages, which would otherwise shadow this folder for ``python -m
benchmarks.<script>``.
"""
