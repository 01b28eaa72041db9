"""pytest-benchmark suites for enat_kernels, and `report.py` that renders their JSON.

A package so that pytest puts the repository root on sys.path (the in-place build of
enat_kernels is importable) and the bench_*.py modules share the helpers here.
See benchmarks/README.md.
"""
