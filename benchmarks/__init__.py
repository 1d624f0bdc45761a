"""The benchmark package: ``python benchmarks/run.py --help`` (see README.md here)."""
