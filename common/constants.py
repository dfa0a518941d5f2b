"""Constants that more than one package uses, each defined once."""

#: How a controller halts: whole rows (``sample``) or single positions (``token``).
GRANULARITIES: tuple[str, ...] = ("sample", "token")
#: What a halted token looks like to the others at token granularity (see ``halting.loop``).
TOKEN_POLICIES: tuple[str, ...] = ("frozen", "evolving")
#: Target id that marks a position without a target (PyTorch's cross-entropy default).
IGNORE_INDEX: int = -100
#: Data splits every task provides: training, in-distribution validation, harder extrapolation.
SPLITS: tuple[str, ...] = ("train", "val", "hard")
#: ``fixedpoint.solve`` stop criteria: absolute or relative residual.
STOP_MODES: tuple[str, ...] = ("abs", "rel")
#: ``fixedpoint.solve`` gradient modes.
BACKWARDS: tuple[str, ...] = ("implicit", "phantom", "one_step", "unroll")
