"""fastgen's benchmark suites (``bench_<op>.py``) and their harness; installed as ``fastgen.benchmarks``."""
