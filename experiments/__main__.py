"""``python -m experiments`` is the ``loopscope`` command (the Hydra app)."""

from experiments.cli.app import main

if __name__ == "__main__":
    main()
