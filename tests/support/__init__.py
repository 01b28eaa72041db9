"""What the test suites share (fixtures stay in tests/conftest.py, which pytest requires).

- attention_cases: the SC-Attention cases every backend runs, input builders with NaN
  padding, and the independent float64 oracle.
- attention_checks: forward + backward of an attention function, and the comparison
  of a backend's results with the oracle under the accuracy rule.
- tolerances: that accuracy rule (a multiple of plain PyTorch's own error).
- backends: which device each backend's tests run on, and skipping a backend that
  cannot run an op here.
- unowned_rows: packed inputs with rows no sequence owns, and what those rows must hold.
- triton_jit: Triton specialization keys of a launch, computed without a GPU.
- enat_models: random ENAT models whose outputs react to labels and attention.
- enat_direct: a direct implementation of the published ENAT model, sharing no code with enat/.
- paired_scripts: running benchmarks/paired*.py end to end.
- paths: the repository's folders, and importing another test module by its path.

Imported as ``support`` (tests/ is on sys.path: pyproject.toml's ``pythonpath``).
"""
