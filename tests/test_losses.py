"""losses.py against formulas written out here with math on python floats."""

import math

import pytest
import torch

from sso_mini.losses import dpo_loss, implicit_rewards, ipo_loss, sso_loss

# Two records, six sequences each: chosen, rejected, p_chosen, p_rejected, n_chosen, n_rejected.
POLICY = [[-20.0, -30.0, -18.0, -33.0, -25.0, -21.0],
          [-45.0, -40.0, -50.0, -38.0, -30.0, -44.0]]
REF = [[-22.0, -29.0, -19.0, -30.0, -26.0, -20.0],
       [-44.0, -41.0, -47.0, -39.0, -33.0, -43.0]]
LENGTHS = [[10, 12, 10, 12, 8, 10],
           [20, 16, 20, 16, 15, 20]]
THETA, ALPHA, GAMMA = 0.1, 0.66, 0.1


def tensors(policy=POLICY, ref=REF, lengths=LENGTHS):
    return (torch.tensor(policy, dtype=torch.float64, requires_grad=True),
            torch.tensor(ref, dtype=torch.float64), torch.tensor(lengths))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def naive_dpo(pc, pr, rc, rr, beta):
    return -math.log(sigmoid(beta * ((pc - rc) - (pr - rr))))


def naive_ipo(pc, pr, rc, rr, beta):
    return (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2


def naive_terms(i, loss_type):
    """(L_base, L_pos, L_neg, W, mean logps) of record i, spelled out."""
    p, r, n = POLICY[i], REF[i], LENGTHS[i]
    if loss_type == "ipo":
        beta = 0.2
        pair = lambda c, d: naive_ipo(p[c] / n[c], p[d] / n[d], r[c] / n[c], r[d] / n[d], beta)
    else:
        beta = 0.1
        pair = lambda c, d: naive_dpo(p[c], p[d], r[c], r[d], beta)
    mean = [p[k] / n[k] for k in range(6)]
    W = sigmoid(-(ALPHA * mean[0] + (1 - ALPHA) * mean[1]))
    return pair(0, 1), pair(2, 3), pair(4, 5), W, mean


# (form, use_w, use_g) -> per-example loss from (L, Lp, Ln, W)
EXPECTED = {
    ("v1", True, True): lambda L, Lp, Ln, W: W * (L + THETA * (Lp + Ln)),
    ("v1", False, True): lambda L, Lp, Ln, W: L + THETA * (Lp + Ln),
    ("v1", True, False): lambda L, Lp, Ln, W: W * L,
    ("v1", False, False): lambda L, Lp, Ln, W: L,
    ("w_on_g", True, True): lambda L, Lp, Ln, W: L + W * THETA * (Lp + Ln),
    ("w_on_g", False, True): lambda L, Lp, Ln, W: L + THETA * (Lp + Ln),  # the first commit's w/o W
    ("w_on_g", True, False): lambda L, Lp, Ln, W: W * L,
    ("w_on_g", False, False): lambda L, Lp, Ln, W: L,
}


def test_dpo_loss_matches_formula():
    pc, pr, rc, rr, beta = -10.0, -12.0, -11.0, -11.5, 0.1
    h = (-10.0 - -11.0) - (-12.0 - -11.5)  # 1.5
    expected = math.log(1 + math.exp(-beta * h))
    got = dpo_loss(*(torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=beta)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # default beta is 0.1
    assert dpo_loss(*(torch.tensor([v]) for v in (pc, pr, rc, rr))).item() == pytest.approx(expected, rel=1e-6)


def test_ipo_loss_matches_formula():
    pc, pr, rc, rr = -1.0, -1.5, -1.2, -1.3
    h = (-1.0 + 1.2) - (-1.5 + 1.3)  # 0.4
    expected = (h - 1 / (2 * 0.2)) ** 2  # default beta 0.2 -> target 2.5
    got = ipo_loss(*(torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr)))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got = ipo_loss(*(torch.tensor([v], dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=0.5)
    assert got.item() == pytest.approx((0.4 - 1.0) ** 2, rel=1e-12)


@pytest.mark.parametrize("loss_type", ["ipo", "dpo"])
@pytest.mark.parametrize("form,use_w,use_g", list(EXPECTED))
def test_sso_forms_and_ablations(loss_type, form, use_w, use_g):
    per_example = [EXPECTED[form, use_w, use_g](*naive_terms(i, loss_type)[:4]) for i in range(2)]
    loss, metrics = sso_loss(*tensors(), loss_type=loss_type, form=form, use_w=use_w, use_g=use_g)
    assert loss.item() == pytest.approx(sum(per_example) / 2, rel=1e-10)
    assert metrics["loss"] == pytest.approx(sum(per_example) / 2, rel=1e-6)  # metrics are float32
    # unweighted_loss: the same objective with W = 1
    raw = [EXPECTED[form, False, use_g](*naive_terms(i, loss_type)[:4]) for i in range(2)]
    assert metrics["unweighted_loss"] == pytest.approx(sum(raw) / 2, rel=1e-6)
    assert metrics["W"] == pytest.approx(sum(naive_terms(i, loss_type)[3] for i in range(2)) / 2, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "dpo"])
@pytest.mark.parametrize("terms", [("pos", "neg"), ("pos",), ("neg",)])
@pytest.mark.parametrize("gamma", [0.1, 0.0])
@pytest.mark.parametrize("use_w", [True, False])
def test_the_v2_generator_loss(loss_type, terms, gamma, use_w):
    """L+ = L(x+, y+, y-) + gamma SFT(x+, y+), L- = L(x-, y^o, y+) + gamma SFT(x-, y^o); no W, no base term."""
    expected = 0.0
    for i in range(2):
        L, Lp, Ln, W, mean = naive_terms(i, loss_type)
        L_plus, L_minus = Lp + gamma * -mean[2], Ln + gamma * -mean[4]
        expected += ((L_plus if "pos" in terms else 0.0) + (L_minus if "neg" in terms else 0.0)) / 2
    loss, metrics = sso_loss(*tensors(), loss_type=loss_type, form="generator", use_w=use_w, gamma=gamma, terms=terms)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["unweighted_loss"] == pytest.approx(expected, rel=1e-6)


def test_the_generator_terms_change_exactly_the_pairs_they_name():
    policy, ref, lengths = tensors()
    policy.requires_grad_(True)
    for terms, used in ((("pos",), {2, 3}), (("neg",), {4, 5}), (("pos", "neg"), {2, 3, 4, 5})):
        policy.grad = None
        sso_loss(policy, ref, lengths, form="generator", terms=terms)[0].backward()
        touched = {c for c in range(6) if policy.grad[:, c].abs().sum() > 0}
        assert touched == used, terms  # the base pair (columns 0, 1) never enters the generator's loss


def test_w_mean_is_sum_over_len_per_example():
    """Batch of one vs batch of two: W of each record depends on that record only (no broadcast bug)."""
    policy, ref, lengths = tensors()
    _, both = sso_loss(policy, ref, lengths)
    _, first = sso_loss(policy[:1], ref[:1], lengths[:1])
    _, second = sso_loss(policy[1:], ref[1:], lengths[1:])
    w0 = sigmoid(-(ALPHA * -20.0 / 10 + (1 - ALPHA) * -30.0 / 12))
    w1 = sigmoid(-(ALPHA * -45.0 / 20 + (1 - ALPHA) * -40.0 / 16))
    assert first["W"] == pytest.approx(w0, rel=1e-6)
    assert second["W"] == pytest.approx(w1, rel=1e-6)
    assert both["W"] == pytest.approx((w0 + w1) / 2, rel=1e-6)


def ipo_grads_by_hand(use_w):
    """d loss / d policy_logps for record 0 alone, v1 IPO, derived by hand."""
    p, r, n = POLICY[0], REF[0], LENGTHS[0]
    beta = 0.2
    L, Lp, Ln, W, mean = naive_terms(0, "ipo")
    raw = L + THETA * (Lp + Ln)
    err = lambda c, d: ((p[c] / n[c] - r[c] / n[c]) - (p[d] / n[d] - r[d] / n[d])) - 1 / (2 * beta)
    # dL/d l_chosen = 2*err / n_chosen ; dL/d l_rejected = -2*err / n_rejected
    dL = [2 * err(0, 1) / n[0], -2 * err(0, 1) / n[1],
          THETA * 2 * err(2, 3) / n[2], -THETA * 2 * err(2, 3) / n[3],
          THETA * 2 * err(4, 5) / n[4], -THETA * 2 * err(4, 5) / n[5]]
    if not use_w:
        return dL
    # W = sigmoid(-z), z = alpha*l0/n0 + (1-alpha)*l1/n1 -> dW/dl0 = -W(1-W)*alpha/n0
    dW = [-W * (1 - W) * ALPHA / n[0], -W * (1 - W) * (1 - ALPHA) / n[1], 0, 0, 0, 0]
    return [W * dL[k] + dW[k] * raw for k in range(6)]


@pytest.mark.parametrize("use_w", [True, False])
def test_gradient_through_w(use_w):
    policy = torch.tensor(POLICY[:1], dtype=torch.float64, requires_grad=True)
    ref, lengths = torch.tensor(REF[:1], dtype=torch.float64), torch.tensor(LENGTHS[:1])
    loss, _ = sso_loss(policy, ref, lengths, loss_type="ipo", form="v1", use_w=use_w)
    loss.backward()
    assert policy.grad[0].tolist() == pytest.approx(ipo_grads_by_hand(use_w), rel=1e-9)
    if use_w:  # the W' term is really there: a detached W would give W * dL only
        L, Lp, Ln, W, _ = naive_terms(0, "ipo")
        detached = [W * g for g in ipo_grads_by_hand(False)]
        assert abs(policy.grad[0, 0].item() - detached[0]) > 1e-3
        assert abs(policy.grad[0, 1].item() - detached[1]) > 1e-3


def test_w_gradient_without_g_dpo():
    """use_g=False, DPO: d(W*L)/dl0 = W*dL/dl0 + L*dW/dl0 by hand; the G columns get no gradient."""
    policy, ref, lengths = tensors()
    loss, _ = sso_loss(policy, ref, lengths, loss_type="dpo", use_g=False)
    loss.backward()
    for i in range(2):
        p, r, n = POLICY[i], REF[i], LENGTHS[i]
        L, _, _, W, _ = naive_terms(i, "dpo")
        s = sigmoid(0.1 * ((p[0] - r[0]) - (p[1] - r[1])))
        dL0, dL1 = -(1 - s) * 0.1, (1 - s) * 0.1  # d(-log sigmoid(beta*h))/d l0, / d l1
        dW0 = -W * (1 - W) * ALPHA / n[0]
        dW1 = -W * (1 - W) * (1 - ALPHA) / n[1]
        assert policy.grad[i, 0].item() == pytest.approx((W * dL0 + L * dW0) / 2, rel=1e-9)  # batch mean
        assert policy.grad[i, 1].item() == pytest.approx((W * dL1 + L * dW1) / 2, rel=1e-9)
        assert policy.grad[i, 2:].abs().max().item() == 0.0


def test_without_w_base_pair_enters_only_through_l():
    """DPO, use_w=False: shifting log pi(y+|x) and log pi(y-|x) by the same amount keeps h,
    so the loss is unchanged; with W on, the less likely pair gets a larger W and loss."""
    shifted = [row[:] for row in POLICY]
    for row in shifted:
        row[0] -= 3.0
        row[1] -= 3.0
    off, _ = sso_loss(*tensors(), loss_type="dpo", use_w=False)
    off_shifted, _ = sso_loss(*tensors(policy=shifted), loss_type="dpo", use_w=False)
    assert off.item() == pytest.approx(off_shifted.item(), rel=1e-12)
    on, _ = sso_loss(*tensors(), loss_type="dpo")
    on_shifted, _ = sso_loss(*tensors(policy=shifted), loss_type="dpo")
    assert on_shifted.item() > on.item() * (1 + 1e-4)


@pytest.mark.parametrize("use_g", [True, False])
def test_normalisation_sum_vs_mean(use_g):
    """DPO uses sums, IPO per-token means (W is off so only L sees the counts)."""
    def loss(loss_type, policy=POLICY, ref=REF, lengths=LENGTHS):
        return sso_loss(*tensors(policy, ref, lengths), loss_type=loss_type, use_w=False, use_g=use_g)[0].item()
    double = [[2 * n for n in row] for row in LENGTHS]
    assert loss("dpo", lengths=double) == pytest.approx(loss("dpo"), rel=1e-12)
    assert abs(loss("ipo", lengths=double) - loss("ipo")) > 1e-3
    # log-probs and counts scaled together keep the means: IPO unchanged, DPO changed
    scale = lambda rows, k: [[k * v for v in row] for row in rows]
    args = dict(policy=scale(POLICY, 3), ref=scale(REF, 3), lengths=scale(LENGTHS, 3))
    assert loss("ipo", **args) == pytest.approx(loss("ipo"), rel=1e-12)
    assert abs(loss("dpo", **args) - loss("dpo")) > 1e-3


def test_metrics_on_hand_example():
    """DPO (sums, beta 0.1) and IPO (means, beta 0.2) rewards, accuracies, margins, logps."""
    _, m = sso_loss(*tensors(), loss_type="dpo")
    # base pair rewards: record 0: 0.1*(-20+22)=0.2 vs 0.1*(-30+29)=-0.1 ; record 1: -0.1 vs 0.1
    assert m["rewards/chosen"] == pytest.approx((0.2 + -0.1) / 2)
    assert m["rewards/rejected"] == pytest.approx((-0.1 + 0.1) / 2)
    assert m["rewards/accuracies"] == 0.5
    assert m["rewards/margins"] == pytest.approx((0.3 + -0.2) / 2)
    assert m["logps/chosen"] == pytest.approx((-20 - 45) / 2)
    assert m["logps/rejected"] == pytest.approx((-30 - 40) / 2)
    # p pair: r0: 0.1 vs -0.3 ; r1: -0.3 vs 0.1
    assert m["p_rewards/accuracies"] == 0.5
    assert m["p_rewards/margins"] == pytest.approx((0.4 + -0.4) / 2)
    # n pair (chosen y^o, rejected y+ under x-): r0: 0.1 vs -0.1 ; r1: 0.3 vs -0.1
    assert m["n_rewards/chosen"] == pytest.approx((0.1 + 0.3) / 2)
    assert m["n_rewards/accuracies"] == 1.0
    assert m["n_rewards/margins"] == pytest.approx((0.2 + 0.4) / 2)
    assert m["n_logps/chosen"] == pytest.approx((-25 - 30) / 2)
    assert m["n_logps/rejected"] == pytest.approx((-21 - 44) / 2)

    _, m = sso_loss(*tensors(), loss_type="ipo")
    # rewards on per-token means with beta 0.2; logps stay summed
    c0, r0 = 0.2 * (-20 / 10 + 22 / 10), 0.2 * (-30 / 12 + 29 / 12)
    c1, r1 = 0.2 * (-45 / 20 + 44 / 20), 0.2 * (-40 / 16 + 41 / 16)
    assert m["rewards/chosen"] == pytest.approx((c0 + c1) / 2)
    assert m["rewards/rejected"] == pytest.approx((r0 + r1) / 2)
    assert m["rewards/margins"] == pytest.approx((c0 - r0 + c1 - r1) / 2)
    assert m["rewards/accuracies"] == 0.5
    assert m["logps/chosen"] == pytest.approx((-20 - 45) / 2)

    names = {"loss", "unweighted_loss", "W"} | {f"{p}{k}" for p in ("", "p_", "n_") for k in (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected")}
    assert set(m) == names
    assert all(type(v) is float for v in m.values())


def test_explicit_beta_and_hyperparameters():
    L, Lp, Ln, W, _ = naive_terms(0, "dpo")
    p, r = POLICY[0], REF[0]
    pair = lambda c, d: naive_dpo(p[c], p[d], r[c], r[d], 0.5)
    mean = [p[k] / LENGTHS[0][k] for k in range(6)]
    W = sigmoid(-(0.3 * mean[0] + 0.7 * mean[1]))
    expected = W * (pair(0, 1) + 0.25 * (pair(2, 3) + pair(4, 5)))
    policy, ref, lengths = tensors()
    loss, _ = sso_loss(policy[:1], ref[:1], lengths[:1], loss_type="dpo", beta=0.5, theta=0.25, alpha=0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "sigmoid"}, r"'sigmoid'.*'ipo', 'dpo'"),
    ({"form": "init"}, r"'init'.*'v1', 'w_on_g', 'generator'"),
    ({"form": "generator", "terms": ()}, "non-empty subset"),
    ({"form": "generator", "terms": ("base",)}, "non-empty subset"),
    ({"beta": 0.0}, "beta"),
    ({"theta": -1.0}, "theta must be >= 0"),
    ({"alpha": 2.0}, r"alpha in \[0, 1\]"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sso_loss(*tensors(), **kwargs)


def test_bad_shapes_and_lengths():
    policy, ref, lengths = tensors()
    with pytest.raises(ValueError, match="ref_logps"):
        sso_loss(policy, ref[:, :4], lengths)
    with pytest.raises(ValueError, match="policy_logps"):
        sso_loss(policy[:, :3], ref[:, :3], lengths[:, :3])
    with pytest.raises(ValueError, match="lengths"):
        sso_loss(policy, ref, torch.zeros_like(lengths))


def test_implicit_rewards_read_the_log_probs_as_each_loss_does():
    # y+: 10 tokens, pi -10 vs ref -12; y-: 2 tokens, pi -3 vs ref -4. Summed, y+ gained more (2 > 1);
    # per token, y- did (0.5 > 0.2): DPO and IPO disagree on the sign of the margin.
    pi = torch.tensor([[-10.0, -3.0, -1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-12.0, -4.0, -1.0, -1.0, -1.0, -1.0]])
    lengths = torch.tensor([[10, 2, 1, 1, 1, 1]])
    dpo = implicit_rewards(pi, ref, lengths, "dpo")
    ipo = implicit_rewards(pi, ref, lengths, "ipo", beta=0.5)
    assert dpo[0, :2].tolist() == pytest.approx([0.1 * 2, 0.1 * 1])
    assert ipo[0, :2].tolist() == pytest.approx([0.5 * 0.2, 0.5 * 0.5])
    assert (dpo[0, 0] - dpo[0, 1]) > 0 > (ipo[0, 0] - ipo[0, 1])
    for loss_type, rewards in (("dpo", dpo), ("ipo", ipo)):  # sso_loss's rewards/* are these
        beta = 0.5 if loss_type == "ipo" else None
        _, m = sso_loss(pi, ref, lengths, loss_type=loss_type, beta=beta)
        assert m["rewards/margins"] == pytest.approx((rewards[0, 0] - rewards[0, 1]).item())
