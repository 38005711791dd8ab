"""pylvs benchmarks: ``python -m bench NAME [--json PATH]`` (engine, e2e)."""
