"""``python -m experiments.bench`` is ``loopscope-bench``."""

import sys

from experiments.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
