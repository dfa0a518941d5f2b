"""The benchmark suite ``loopscope-bench``: the runner (``suite``), measuring helpers (``core``) and
the benchmarks (``loop``, ``solvers``, ``study``)."""
