"""Loop controllers behind one interface, and the training losses of learned halting.

``run_loop(model, tokens, controller, max_loops=...)`` runs a ``models.LoopedModel`` under any
controller built by ``build_controller(name_or_cfg, **params)``. Controllers (registry
``CONTROLLERS``): ``fixed``, ``convergence``, ``solver``, ``act``, ``pondernet``, ``ouro_gate``,
``halt_token``, ``q_halt``. The protocol (``begin(RunState)`` / ``decide(StepView)`` /
``finish(LoopDraft)`` with declared ``Capabilities``) is in ``halting.base``. Every controller's
``loss_terms(out, targets)`` gives the named scalar losses whose sum is its training objective.
"""

from halting import learned, qhalt, simple, solver  # noqa: F401  (register the controllers)
from halting.base import (
    CONTROLLERS,
    GRANULARITIES,
    Capabilities,
    LoopController,
    LoopDraft,
    LoopOutput,
    RunState,
    StepView,
    build_controller,
    controller_defaults,
    task_loss,
)
from halting.depth import sample_training_depth
from halting.generate import GenerateOutput, generate
from halting.learned import AdaptiveComputationTime, HaltToken, OuroGate, PonderNet
from halting.loop import MODES, TOKEN_POLICIES, run_loop, set_run_mode
from halting.qhalt import QHalt
from halting.simple import CRITERIA, ConvergenceExit, Criterion, FixedLoops
from halting.solver import SolverController

__all__ = [
    "CONTROLLERS", "CRITERIA", "GRANULARITIES", "MODES", "TOKEN_POLICIES",
    "AdaptiveComputationTime", "Capabilities", "ConvergenceExit", "Criterion", "FixedLoops",
    "GenerateOutput", "HaltToken", "LoopController", "LoopDraft", "LoopOutput", "OuroGate",
    "PonderNet", "QHalt", "RunState", "SolverController", "StepView", "build_controller",
    "controller_defaults", "generate", "run_loop", "set_run_mode", "sample_training_depth",
    "task_loss",
]
