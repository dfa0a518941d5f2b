"""A learned controller trained briefly uses more loops on inputs that need more loops.

Task ("copy the token k positions back"): the last position holds a marker for k in {1, 2, 3}
and must predict the token k positions before it. The toy model's attention window is 2, so
information moves one position per loop: the answer is out of reach before loop k. A halting
distribution trained on the per-sample expected loss must therefore exit later for larger k.
"""

import pytest
import torch
from _toy import ToyLoop

from halting import build_controller, run_loop

SEQ, MAX_LOOPS = 8, 5


def hop_batch(batch, generator):
    tokens = torch.randint(4, 16, (batch, SEQ), generator=generator)
    hops = torch.randint(1, 4, (batch,), generator=generator)
    tokens[:, -1] = hops - 1  # the marker tells the last position how far back to look
    targets = torch.full((batch, SEQ), -100)
    targets[:, -1] = tokens[torch.arange(batch), SEQ - 1 - hops]
    return tokens, targets, hops


def spearman(a, b):
    rank = lambda x: x.float().argsort().argsort().float()
    ra, rb = rank(a) - rank(a).mean(), rank(b) - rank(b).mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm())).item()


def train_and_evaluate(name, steps=300, **params):
    torch.manual_seed(0)
    model = ToyLoop(vocab_size=16, d_model=32, max_seq_len=SEQ, window=2)
    controller = build_controller(name, **params)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(controller.parameters()),
                                 lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    controller.train()
    for _ in range(steps):
        tokens, targets, _ = hop_batch(64, generator)
        out = run_loop(model, tokens, controller, max_loops=MAX_LOOPS, targets=targets)
        loss = sum(out.loss_terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()  # the controller follows the model's mode (run_loop mode="auto")
    controller.eval()
    tokens, targets, hops = hop_batch(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = run_loop(model, tokens, controller, max_loops=MAX_LOOPS)
    accuracy = (out.logits[:, -1].argmax(-1) == targets[:, -1]).float().mean().item()
    mean_depth = [out.depth[hops == k].float().mean().item() for k in (1, 2, 3)]
    return accuracy, spearman(hops, out.depth), mean_depth, out


def test_pondernet_learns_to_loop_longer_on_harder_inputs():
    accuracy, rho, mean_depth, out = train_and_evaluate("pondernet", inference="cdf")
    assert rho > 0.3, (rho, mean_depth)
    assert mean_depth[0] < mean_depth[1] < mean_depth[2]
    assert accuracy > 0.5
    assert out.executed == int(out.depth.sum()) < 512 * MAX_LOOPS  # compaction at evaluation


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("ouro_gate", {"beta": 0.01}),
                                         ("pondernet", {"inference": "sample"})])
def test_other_learned_controllers_loop_longer_on_harder_inputs(name, params):
    accuracy, rho, mean_depth, _ = train_and_evaluate(name, **params)
    assert rho > 0.3, (rho, mean_depth)
    assert mean_depth[0] < mean_depth[2]
