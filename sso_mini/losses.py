"""Preference losses: DPO, IPO and the SSO objective (docs/algorithm.md), on per-sequence log-probs (summed
response-token log-probs and token counts), never a model, so they can be tested on hand-picked numbers.

Every [B, 6] tensor has one record's six sequences, the columns of batches.SEQUENCES: chosen, rejected (x: y+ > y-),
p_chosen, p_rejected (x+: y+ > y-), n_chosen, n_rejected (x-: y^o > y+). Under x- the raw y^o beats y+ (not
y- > y+), so that p- does not become a way to elicit y-.
"""

import torch
import torch.nn.functional as F

from .batches import SEQUENCES

COLUMNS = tuple(name for name, _, _ in SEQUENCES)
CHOSEN, REJECTED, P_CHOSEN, P_REJECTED, N_CHOSEN, N_REJECTED = map(COLUMNS.index, (
    "chosen", "rejected", "p_chosen", "p_rejected", "n_chosen", "n_rejected"))
PAIRS = (("", CHOSEN, REJECTED), ("p_", P_CHOSEN, P_REJECTED), ("n_", N_CHOSEN, N_REJECTED))

LOSS_TYPES = ("ipo", "dpo")
FORMS = ("v1", "w_on_g", "generator")  # w_on_g: W weighs G only; generator: v2's data generator (--recipe v2)
TERMS = ("pos", "neg")  # the generator's L+ and L-
DEFAULT_BETA = {"ipo": 0.2, "dpo": 0.1}  # IPO: the released code's train.sh; DPO: v2 §5.1


def _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected):
    """h = [l_pi(y_w) - l_ref(y_w)] - [l_pi(y_l) - l_ref(y_l)], the implicit reward margin."""
    return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # [B]


def loss_logps(logps, lengths, loss_type):
    """Summed log-probs as the base loss takes them: per-token means for IPO, the sums for DPO."""
    return logps / lengths.to(logps.dtype) if loss_type == "ipo" else logps


def implicit_rewards(policy_logps, ref_logps, lengths, loss_type="ipo", beta=None):
    """[B, 6] reward beta * (l_pi - l_ref), l as loss_logps gives it (TRL's rewards/*, the held-out signal)."""
    beta = DEFAULT_BETA[loss_type] if beta is None else beta
    return beta * (loss_logps(policy_logps, lengths, loss_type) - loss_logps(ref_logps, lengths, loss_type))


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1):
    """DPO: -log sigmoid(beta * h) per example [B]. Pass SUMMED log-probs."""
    return -F.logsigmoid(beta * _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


def ipo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.2):
    """IPO: (h - 1/(2 beta))^2 per example [B]. Pass PER-TOKEN-MEAN log-probs: IPO regresses the margin onto a
    fixed target instead of pushing it to infinity, and with means that target does not depend on length."""
    return (_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2


def weight_W(mean_pos, mean_neg, alpha=0.66):
    """W = sigmoid(-(alpha * pi~(y+|x) + (1 - alpha) * pi~(y-|x))), [B], from per-token-mean log-probs under x.
    In (0.5, 1) since log-probs are negative; largest for pairs the policy finds unlikely."""
    return torch.sigmoid(-(alpha * mean_pos + (1 - alpha) * mean_neg))


def columns_read(form="v1", use_g=True, terms=TERMS) -> tuple:
    """The columns the objective reads, the only ones scoring runs: v1 and w_on_g all six; without G (w/o G, PBAA,
    v2's policy stage) the base pair, which is also W's input; the generator the pairs of its terms."""
    if form == "generator":
        return tuple(c for name, pair in zip(TERMS, ((P_CHOSEN, P_REJECTED), (N_CHOSEN, N_REJECTED)))
                     if name in terms for c in pair)
    return tuple(range(len(COLUMNS))) if use_g else (CHOSEN, REJECTED)


def full_columns(values, columns, fill: float):
    """[B, k] values of `columns` -> [B, 6], `fill` in the columns no one scored."""
    out = values.new_full((len(values), len(COLUMNS)), fill)
    out[:, list(columns)] = values
    return out


def steering_terms(l_pi, l_ref, base_loss, beta):
    """G's two terms, [B] each: L(x+: y+ > y-) and L(x-: y^o > y+), on [B, 6] log-probs as loss_logps gives them."""
    def L(c, r):  # base loss of the pair (column c chosen, column r rejected)
        return base_loss(l_pi[:, c], l_pi[:, r], l_ref[:, c], l_ref[:, r], beta)

    return L(P_CHOSEN, P_REJECTED), L(N_CHOSEN, N_REJECTED)


def check_settings(loss_type, form, terms, beta, theta, alpha):
    """Refuse a setting the objective does not define, naming what is allowed."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if form == "generator" and (not terms or set(terms) - set(TERMS)):
        raise ValueError(f"the generator's terms must be a non-empty subset of {TERMS}, got {terms!r}")
    if beta is not None and beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if theta < 0 or not 0 <= alpha <= 1:
        raise ValueError(f"theta must be >= 0 and alpha in [0, 1], got theta {theta}, alpha {alpha}")


def check_shapes(policy_logps, ref_logps, lengths):
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps), ("lengths", lengths)):
        if t.dim() != 2 or t.shape[1] != len(COLUMNS) or t.shape != policy_logps.shape:
            raise ValueError(f"{name} must have shape [B, 6] like policy_logps "
                             f"{tuple(policy_logps.shape)}, got {tuple(t.shape)}")
    if (lengths <= 0).any():
        raise ValueError("lengths must be positive response-token counts")


def sso_loss(policy_logps, ref_logps, lengths, *, loss_type="ipo", form="v1", use_w=True,
             use_g=True, theta=0.1, alpha=0.66, beta=None, gamma=0.1, terms=TERMS):
    """The SSO objective on one batch of records: (batch-mean loss, metrics as floats).

    policy_logps (differentiable), ref_logps: [B, 6] summed response log-probs; lengths: [B, 6] token counts. With L
    the base loss (IPO on per-token means, DPO on sums), G = L(x+: y+ > y-) + L(x-: y^o > y+) and W = weight_W:
        v1 (the paper's v1 and first released commit, default):  W * (L(x: y+ > y-) + theta * G)
        w_on_g (the latest released commit):                      L(x: y+ > y-) + W * theta * G
        generator (v2's data generator), `terms` keeping L+ ("pos"), L- ("neg") or both (v2 Table 3):
            L+ = L(x+: y+ > y-) - gamma * mean_logp(y+|x+)    (v2 Eq. 2: IPO plus SFT on the chosen side)
            L- = L(x-: y^o > y+) - gamma * mean_logp(y^o|x-)  (v2 Eq. 4)
    Ablations of v1 and w_on_g: use_w=False -> L + theta * G, use_g=False -> W * L, neither -> L (PBAA).
    W is not detached: its gradient raises log pi(y+|x) and log pi(y-|x), which keeps the pair on-policy.
    Columns the form does not read (columns_read) may hold NaN: they were never scored, and no term they reach
    enters the loss. metrics: loss, unweighted_loss (W set to 1), W, and pair_stats of pairs "", "p_", "n_" (n_:
    y^o over y+), each where its columns are read.
    """
    check_settings(loss_type, form, terms, beta, theta, alpha)
    check_shapes(policy_logps, ref_logps, lengths)
    beta = DEFAULT_BETA[loss_type] if beta is None else beta
    lengths = lengths.to(policy_logps.dtype)
    mean_logps = policy_logps / lengths  # [B, 6] pi~(y|x), used by W and SFT whatever the loss
    base_loss = ipo_loss if loss_type == "ipo" else dpo_loss
    l_pi, l_ref = loss_logps(policy_logps, lengths, loss_type), loss_logps(ref_logps, lengths, loss_type)

    L_base = base_loss(l_pi[:, CHOSEN], l_pi[:, REJECTED], l_ref[:, CHOSEN], l_ref[:, REJECTED], beta)  # x: y+ > y-
    L_pos, L_neg = steering_terms(l_pi, l_ref, base_loss, beta)  # x+: y+ > y-,  x-: y^o > y+
    G = L_pos + L_neg  # [B]
    W = weight_W(mean_logps[:, CHOSEN], mean_logps[:, REJECTED], alpha)  # [B]

    if form == "generator":
        L_plus = L_pos - gamma * mean_logps[:, P_CHOSEN]  # [B]
        L_minus = L_neg - gamma * mean_logps[:, N_CHOSEN]  # [B]
        unweighted = loss = sum(term for name, term in (("pos", L_plus), ("neg", L_minus)) if name in terms)
    elif form == "w_on_g" and use_w and use_g:
        unweighted, loss = L_base + theta * G, L_base + W * theta * G
    else:  # v1, and every ablation of either form
        unweighted = L_base + theta * G if use_g else L_base
        loss = W * unweighted if use_w else unweighted

    rewards = implicit_rewards(policy_logps.detach(), ref_logps, lengths, loss_type, beta)  # [B, 6]
    read = columns_read(form, use_g, terms)
    stats = {"loss": loss.mean(), "unweighted_loss": unweighted.mean(), **({"W": W.mean()} if CHOSEN in read else {}),
             **pair_stats(policy_logps, rewards, read)}
    values = torch.stack([v.detach().float() for v in stats.values()]).tolist()  # one device sync
    return loss.mean(), dict(zip(stats, values))


def pair_stats(policy_logps, rewards, read=tuple(range(len(COLUMNS)))) -> dict:
    """Batch means of each read pair's rewards/{chosen,rejected,accuracies,margins} and logps/{chosen,rejected} (the
    policy's sums), as TRL's DPOTrainer names them."""
    stats = {}
    for prefix, c, r in (pair for pair in PAIRS if pair[1] in read):
        chosen, rejected = rewards[:, c], rewards[:, r]  # [B]
        stats[f"{prefix}rewards/chosen"] = chosen.mean()
        stats[f"{prefix}rewards/rejected"] = rejected.mean()
        stats[f"{prefix}rewards/accuracies"] = (chosen > rejected).float().mean()
        stats[f"{prefix}rewards/margins"] = (chosen - rejected).mean()
        stats[f"{prefix}logps/chosen"] = policy_logps[:, c].mean()
        stats[f"{prefix}logps/rejected"] = policy_logps[:, r].mean()
    return stats
