"""``python -m experiments`` is the ``loopscope`` command (the Hydra app)."""

from experiments.study import main

if __name__ == "__main__":
    main()
