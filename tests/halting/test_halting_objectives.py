"""The mathematics of learned halting on hand-made numbers: PonderNet's p and KL direction, the
per-sample expected loss, ACT's remainder and ponder cost, Ouro's CDF exit, HRM's Q targets."""

import math

import pytest
import torch
import torch.nn.functional as F

from halting.base import LoopOutput, task_loss
from halting.learned import OuroGate, PonderNet, gather_exit
from halting.objectives import (
    act_weights,
    cdf_exit,
    expected_loss,
    geometric_halting,
    halting_entropy,
    kl_to_prior,
    per_step_losses,
    ponder_cost,
    truncated_geometric_prior,
)
from halting.qhalt import QHalt, q_targets


def test_geometric_halting_sums_to_one_with_lambda_forced_at_cap():
    lambdas = torch.tensor([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5]])  # (K=3, B=2)
    p = geometric_halting(lambdas)
    expected0 = [0.1, 0.9 * 0.2, 0.9 * 0.8 * 1.0]  # the cap takes the rest (lambda_3 -> 1)
    assert p[:, 0].tolist() == pytest.approx(expected0)
    assert p[:, 1].tolist() == pytest.approx([0.5, 0.25, 0.25])
    torch.testing.assert_close(p.sum(0), torch.ones(2))


def test_truncated_geometric_prior_is_normalised():
    prior = truncated_geometric_prior(0.2, 4)
    raw = [0.2 * 0.8**n for n in range(4)]
    assert prior.tolist() == pytest.approx([r / sum(raw) for r in raw])


def test_kl_is_kl_p_to_prior_not_reversed():
    p = torch.tensor([[0.9], [0.09], [0.01]])
    prior = torch.tensor([0.2, 0.3, 0.5])
    pairs = list(zip([0.9, 0.09, 0.01], [0.2, 0.3, 0.5]))
    by_hand = sum(pi * math.log(pi / qi) for pi, qi in pairs)
    reverse = sum(qi * math.log(qi / pi) for pi, qi in pairs)
    assert kl_to_prior(p, prior).item() == pytest.approx(by_hand, rel=1e-5)
    assert abs(by_hand - reverse) > 0.5  # the check can tell the directions apart
    zero_mass = torch.tensor([[1.0], [0.0], [0.0]])
    assert kl_to_prior(zero_mass, prior).item() == pytest.approx(math.log(1 / 0.2))


def test_entropy_and_cdf_exit():
    p = torch.tensor([[0.2, 0.6], [0.2, 0.3], [0.6, 0.1]])
    assert halting_entropy(p)[0].item() == pytest.approx(-(2 * 0.2 * math.log(0.2)
                                                           + 0.6 * math.log(0.6)))
    assert cdf_exit(p, 0.5).tolist() == [3, 1]
    assert cdf_exit(p, 0.4).tolist() == [2, 1]  # CDF exactly at q counts
    assert cdf_exit(p, 0.95).tolist() == [3, 3]


def _step_logits_with_losses(batch_losses):
    """(K, B, T=2, V=3) logits and targets whose per-step, per-sample CE differ."""
    torch.manual_seed(0)
    steps, batch = len(batch_losses), len(batch_losses[0])
    logits = torch.randn(steps, batch, 2, 3) * torch.tensor(batch_losses).view(steps, batch, 1, 1)
    targets = torch.tensor([[0, 1], [2, -100], [1, 1]])[:batch]
    return logits, targets


def test_pondernet_loss_is_per_sample_expectation_not_batch_averaged_first():
    logits, targets = _step_logits_with_losses([[1.0, 3.0, 0.5], [2.0, 0.2, 4.0],
                                                [0.3, 1.0, 2.0]])
    lambdas = torch.tensor([[0.3, 0.6, 0.1], [0.5, 0.2, 0.4], [0.9, 0.9, 0.9]])
    p = geometric_halting(lambdas)
    controller = PonderNet(beta=0.0).train()
    out = LoopOutput(logits=logits[-1], depth=torch.full((3,), 3), executed=9,
                     step_logits=logits, aux={"p": p, "lambdas": lambdas}, max_loops=3,
                     training=True)
    terms = controller.loss_terms(out, targets)
    by_hand = 0.0
    for b in range(3):
        for n in range(3):
            counted = [t for t in range(2) if targets[b, t] != -100]
            loss_bn = sum(F.cross_entropy(logits[n, b, t:t + 1], targets[b, t:t + 1]).item()
                          for t in counted) / len(counted)
            by_hand += p[n, b].item() * loss_bn
    assert terms["task"].item() == pytest.approx(by_hand / 3, rel=1e-5)
    batch_first = sum(p[n].mean().item() * per_step_losses(logits, targets, "sample")[n].mean()
                      .item() for n in range(3))
    assert abs(batch_first - by_hand / 3) > 1e-3  # the lucidrains bug would give this instead


def test_pondernet_kl_term_and_ouro_entropy_term():
    logits, targets = _step_logits_with_losses([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    lambdas = torch.tensor([[0.3, 0.6], [0.5, 0.2], [0.9, 0.9]])
    p = geometric_halting(lambdas)
    out = LoopOutput(logits=logits[-1], depth=torch.full((2,), 3), executed=6,
                     step_logits=logits, aux={"p": p}, max_loops=3, training=True)
    kl = PonderNet(lambda_prior=0.3, beta=0.5).train().loss_terms(out, targets[:2])["kl"]
    prior = truncated_geometric_prior(0.3, 3)
    assert kl.item() == pytest.approx(0.5 * kl_to_prior(p, prior).mean().item(), rel=1e-6)
    ent = OuroGate(beta=0.25).train().loss_terms(out, targets[:2])["entropy"]
    assert ent.item() == pytest.approx(-0.25 * halting_entropy(p).mean().item(), rel=1e-6)


def test_per_step_losses_token_and_expected_loss():
    logits, targets = _step_logits_with_losses([[1.0, 2.0], [0.5, 1.5]])
    per_token = per_step_losses(logits, targets[:2], "token")
    assert per_token.shape == (2, 2, 2) and per_token[0, 1, 1] == 0  # ignored target
    p = torch.tensor([[0.25, 1.0], [0.75, 0.0]])
    per_sample = per_step_losses(logits, targets[:2], "sample")
    torch.testing.assert_close(expected_loss(p, per_sample),
                               0.25 * per_sample[0] * torch.tensor([1.0, 0.0])
                               + torch.stack([0.75 * per_sample[1, 0], per_sample[0, 1]]))


def test_act_remainder_weights_and_ponder_cost():
    h = torch.tensor([[0.3, 0.995, 0.1], [0.5, 0.2, 0.1], [0.4, 0.2, 0.1]])  # (K=3, B=3)
    p, exit_step, remainder = act_weights(h, eps=0.01)
    # sample 0: 0.3 + 0.5 = 0.8, + 0.4 >= 0.99 -> N = 3, R = 1 - 0.8
    assert exit_step.tolist() == [3, 1, 3]
    assert remainder.tolist() == pytest.approx([0.2, 1.0, 0.8])
    assert p[:, 0].tolist() == pytest.approx([0.3, 0.5, 0.2])
    assert p[:, 1].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert p[:, 2].tolist() == pytest.approx([0.1, 0.1, 0.8])  # the cap takes the remainder
    torch.testing.assert_close(p.sum(0), torch.ones(3))
    assert ponder_cost(exit_step, remainder).tolist() == pytest.approx([3.2, 2.0, 3.8])


def test_act_ponder_cost_gradient_flows_only_through_remainder():
    h = torch.tensor([[0.3], [0.5], [0.4]], requires_grad=True)
    _, exit_step, remainder = act_weights(h, eps=0.01)
    ponder_cost(exit_step, remainder).sum().backward()
    # R = 1 - h_1 - h_2: d rho / d h = (-1, -1, 0); N contributes nothing.
    assert h.grad.squeeze(1).tolist() == pytest.approx([-1.0, -1.0, 0.0])


def test_q_targets_follow_hrm():
    logits = torch.zeros(3, 2, 2, 3)  # (K, B, T, V)
    logits[0, 0, :, 1] = 5  # sample 0 predicts token 1 at step 1: right on both tokens
    logits[1, 0, 0, 2] = 5  # step 2: wrong on token 0
    logits[2, 0, :, 1] = 5
    logits[:, 1, :, 0] = 5  # sample 1 always predicts 0: right only where ignored
    targets = torch.tensor([[1, 1], [2, -100]])
    q = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, -1.0], [-3.0, -4.0]],
                      [[0.5, 0.7], [1.0, 0.0]]])  # (K, B, 2)
    halt_target, cont_target = q_targets(logits, targets, q)
    assert halt_target.tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    expected_cont = [[torch.sigmoid(torch.tensor(2.0)).item(),
                      torch.sigmoid(torch.tensor(-3.0)).item()],
                     [torch.sigmoid(torch.tensor(0.7)).item(),
                      torch.sigmoid(torch.tensor(1.0)).item()]]
    assert cont_target[:2].tolist() == [pytest.approx(row) for row in expected_cont]


def test_q_halt_loss_masks_steps_after_exit_and_continue_at_cap():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 2, 4)
    targets = torch.tensor([[1, 2], [3, -100]])
    q = torch.randn(3, 2, 2)
    depth = torch.tensor([1, 3])
    out = LoopOutput(logits=gather_exit(logits, depth), depth=depth, executed=6,
                     step_logits=logits, aux={"q": q}, max_loops=3, training=True)
    terms = QHalt(d_model=4).train().loss_terms(out, targets)
    lm = per_step_losses(logits, targets, "sample")
    assert terms["task"].item() == pytest.approx((lm[0, 0] + lm[:, 1].mean()).item() / 2)
    halt_t, cont_t = q_targets(logits, targets, q)
    bce = F.binary_cross_entropy_with_logits
    halt0 = bce(q[0, 0, 0], halt_t[0, 0])
    halt1 = bce(q[:, 1, 0], halt_t[:, 1])
    assert terms["q_halt"].item() == pytest.approx(0.5 * (halt0 + halt1).item() / 2, rel=1e-5)
    cont0 = bce(q[0, 0, 1], cont_t[0, 0])  # sample 0 exits at 1: its one step has a next step
    cont1 = bce(q[:2, 1, 1], cont_t[:2, 1])  # sample 1: steps 1, 2 (the cap has none)
    assert terms["q_continue"].item() == pytest.approx(0.5 * (cont0 + cont1).item() / 2,
                                                       rel=1e-5)


def test_default_task_loss_ignores_minus_100():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert task_loss(logits, targets).item() == pytest.approx(expected.item())
