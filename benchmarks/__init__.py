"""The project's own benchmarks: they measure hf_fastif and are not part of the installed package.

Run from the repository root as modules, e.g. ``python -m benchmarks.paper_table --quick``; see
docs/benchmarks.md for what each one measures.
"""
