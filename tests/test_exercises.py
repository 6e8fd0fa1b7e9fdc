"""The course exercises (notebooks/exercises.py): each passes with a solution written from the formulas here
(and with sso-mini's own function), and fails on a plausible wrong attempt with a message naming the case."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "notebooks"))
import exercises  # noqa: E402
from exercises import EXERCISES, Mismatch, check  # noqa: E402


def ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    h = (pi_w / len_w - ref_w / len_w) - (pi_l / len_l - ref_l / len_l)
    return (h - 1 / (2 * beta)) ** 2


def dpo(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def W(mean_pos, mean_neg, alpha):
    return torch.sigmoid(-(alpha * mean_pos + (1 - alpha) * mean_neg))


def G(l_pi, l_ref, beta, neg_chosen=4):
    def L(c, r):
        return ((l_pi[:, c] - l_ref[:, c]) - (l_pi[:, r] - l_ref[:, r]) - 1 / (2 * beta)) ** 2
    return L(2, 3) + L(neg_chosen, 5)


def sso(policy, ref, lengths, use_w, use_g, detach_w=False):
    l_pi, l_ref = policy / lengths, ref / lengths
    base = ((l_pi[:, 0] - l_ref[:, 0]) - (l_pi[:, 1] - l_ref[:, 1]) - 2.5) ** 2
    w = W(l_pi[:, 0], l_pi[:, 1], 0.66)
    w = w.detach() if detach_w else w
    loss = base + 0.1 * G(l_pi, l_ref, 0.2) if use_g else base
    return (w * loss if use_w else loss).mean()


def sequences(record, prompt_ids, encode, eot, neg_chosen="raw"):
    capped = record.get("capped", {})
    prompts = {"x": prompt_ids("", record["prompt"]), "x+": prompt_ids(record["p_system"], record["prompt"]),
               "x-": prompt_ids(record["n_system"], record["prompt"])}
    y = {k: encode(record[k]) + ([] if capped.get(k) else [eot]) for k in ("chosen", "rejected", "raw")}
    return [(prompts["x"], y["chosen"]), (prompts["x"], y["rejected"]), (prompts["x+"], y["chosen"]),
            (prompts["x+"], y["rejected"]), (prompts["x-"], y[neg_chosen]), (prompts["x-"], y["chosen"])]


def masks(seqs, pad_id, shift=0):
    T = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    attention, response = torch.zeros(len(seqs), T, dtype=torch.long), torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention[i, :len(p) + len(r)] = 1
        response[i, len(p) + shift:len(p) + len(r) + shift] = True
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response}


def decode_step(q, k, v, k_cache, v_cache, pos, mask_stale=True):
    k_cache[:, :, pos] = k[:, :, 0]
    v_cache[:, :, pos] = v[:, :, 0]
    scores = q @ k_cache.transpose(-1, -2) / math.sqrt(q.size(-1))  # [B, H, 1, S]
    if mask_stale:
        scores[..., pos + 1:] = float("-inf")
    return scores.softmax(-1) @ v_cache


def generator_loss(policy, ref, lengths, gamma, terms, sft_on_sums=False):
    def L(c, r):
        return -F.logsigmoid(0.1 * ((policy[:, c] - ref[:, c]) - (policy[:, r] - ref[:, r])))
    sft = policy if sft_on_sums else policy / lengths
    parts = {"pos": L(2, 3) - gamma * sft[:, 2], "neg": L(4, 5) - gamma * sft[:, 4]}
    return sum(parts[t] for t in terms).mean()


SOLUTIONS = {"ipo": ipo, "dpo": dpo, "W": W, "G": G, "sso_loss": sso, "sequences": sequences, "masks": masks,
             "decode_step": decode_step, "generator_loss": generator_loss}

WRONG = {  # (exercise, a plausible wrong attempt, the case it must be caught on)
    "IPO on summed log-probs": ("ipo", lambda pw, pl, rw, rl, lw, ll, b: ((pw - rw) - (pl - rl) - 1 / (2 * b)) ** 2,
                                "random pairs, responses of equal length"),
    "DPO through log(sigmoid)": ("dpo",
                                 lambda pw, pl, rw, rl, b: -torch.log(torch.sigmoid(b * ((pw - rw) - (pl - rl)))),
                                 "a very wrong pair (margin -20000)"),
    "W detached": ("W", lambda p, n, a: W(p, n, a).detach(), "random pairs, alpha 0.66"),
    "W with alpha on y-": ("W", lambda p, n, a: W(n, p, a), "random pairs, alpha 0.66"),
    "G- with y- instead of y^o": ("G", lambda lp, lr, b: G(lp, lr, b, neg_chosen=1), "random records"),
    "SSO with W detached": ("sso_loss", lambda *a: sso(*a, detach_w=True), "random records, use_w=True, use_g=True"),
    "SSO without W drops G too (the released code's HEAD)": (
        "sso_loss", lambda p, r, n, use_w, use_g: sso(p, r, n, use_w, use_g and use_w),
        "random records, use_w=False, use_g=True"),
    "G- pair with y- chosen": ("sequences", lambda *a: sequences(*a, neg_chosen="rejected"),
                               "a record of finished answers"),
    "an end of turn on a capped response": ("sequences", lambda rec, p, e, eot: sequences({**rec, "capped": {}}, p, e,
                                                                                          eot),
                                            "y+ capped at the token limit"),
    "response mask off by one": ("masks", lambda s, pad: masks(s, pad, shift=-1), "one sequence"),
    "stale cache slots attended": ("decode_step", lambda *a: decode_step(*a, mask_stale=False),
                                   "the step at slot 0 of 8, stale values after it"),
    "SFT on summed log-probs": ("generator_loss", lambda *a: generator_loss(*a, sft_on_sums=True),
                                "random records, terms ('pos', 'neg')"),
}


def sso_per_record(policy, ref, lengths, use_w, use_g):
    """The same loss, one record at a time, with the reference detached and the lengths as integers."""
    n = lengths.round().long()
    return torch.stack([sso(policy[i:i + 1], ref[i:i + 1].detach(), n[i:i + 1], use_w, use_g)
                        for i in range(len(policy))]).mean()


def decode_step_sdpa(q, k, v, k_cache, v_cache, pos):
    k_cache[:, :, pos:pos + 1].copy_(k)
    v_cache[:, :, pos:pos + 1].copy_(v)
    visible = (torch.arange(k_cache.size(2)) <= pos)[None, :]  # [1, S]: the query sees slots 0..pos
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible)


CORRECT = {  # (exercise, a correct answer written differently from the library)
    "IPO with the reference detached": ("ipo", lambda pw, pl, rw, rl, lw, ll, b: ipo(pw, pl, rw.detach(),
                                                                                      rl.detach(), lw, ll, b)),
    "IPO with integer lengths": ("ipo", lambda pw, pl, rw, rl, lw, ll, b: ipo(pw, pl, rw, rl, lw.round().long(),
                                                                               ll.round().long(), b)),
    "IPO through F.mse_loss": ("ipo", lambda pw, pl, rw, rl, lw, ll, b: F.mse_loss(
        (pw / lw - rw / lw) - (pl / ll - rl / ll),
        torch.full_like(pw, 1 / (2 * b)), reduction="none")),
    "DPO through softplus": ("dpo", lambda pw, pl, rw, rl, b: F.softplus(-b * ((pw - rw) - (pl - rl)))),
    "DPO with the reference detached": ("dpo", lambda pw, pl, rw, rl, b: dpo(pw, pl, rw.detach(), rl.detach(), b)),
    "W through torch.lerp": ("W", lambda p, n, a: torch.sigmoid(-torch.lerp(n, p, a))),
    "G with the reference detached": ("G", lambda lp, lr, b: G(lp, lr.detach(), b)),
    "sso_loss as a per-record loop": ("sso_loss", sso_per_record),
    "decode_step through SDPA": ("decode_step", decode_step_sdpa),
    "generator_loss with the reference detached": (
        "generator_loss", lambda p, r, n, g, t: generator_loss(p, r.detach(), n, g, t)),
}


def decode_step_new_caches(q, k, v, k_cache, v_cache, pos):
    """Writes into fresh tensors: the caller's caches never see this step's keys and values."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    return decode_step(q, k, v, k_cache, v_cache, pos)


def sequences_literal(record, prompt_ids, encode, eot):
    """Reads record['capped'][key] as if every record had it."""
    return sequences({**record, "capped": record["capped"]}, prompt_ids, encode, eot)


WRONG_NEW = {  # (exercise, wrong attempt, the case it must be caught on, what the message must say)
    "cache not written in place": ("decode_step", decode_step_new_caches,
                                   "the step at slot 0 of 8, stale values after it", "k_cache after the call"),
    "a long response_mask": ("masks", lambda s, pad: {**masks(s, pad), "response_mask": masks(s, pad)[
        "response_mask"].long()}, "one sequence", "expected a torch.bool tensor"),
    "code that raises": ("sequences", sequences_literal, "a record of finished answers", "raised KeyError"),
    "a wrong sequence is named and shown as text": (
        "sequences", lambda *a: sequences(*a, neg_chosen="rejected"), "a record of finished answers",
        "sequence x-: y^o: its response is"),
}


def test_every_exercise_has_a_solution_here_and_a_task_with_graded_hints():
    assert set(SOLUTIONS) == set(EXERCISES)
    for name in EXERCISES:
        assert exercises.task(name).startswith(f"{name}: ") and 2 <= len(EXERCISES[name].hints) <= 3
        assert len(exercises.hint(name, 3)) > len(exercises.hint(name)) > len(name) + 2  # each level adds


@pytest.mark.parametrize("variant", CORRECT)
def test_a_correct_answer_written_differently_passes(variant):
    name, fn = CORRECT[variant]
    assert check(name, fn, verbose=False)


@pytest.mark.parametrize("attempt", WRONG_NEW)
def test_a_newly_named_wrong_attempt_fails_saying_what_is_wrong(attempt):
    name, fn, case, says = WRONG_NEW[attempt]
    with pytest.raises(Mismatch) as e:
        check(name, fn, verbose=False)
    assert str(e.value).startswith(f"{name}: case '{case}': ") and says in str(e.value), str(e.value)


@pytest.mark.parametrize("name", EXERCISES)
def test_a_solution_from_the_formulas_passes_and_so_does_the_library(name):
    assert check(name, SOLUTIONS[name], verbose=False)
    assert check(name, EXERCISES[name].reference, verbose=False)  # the library in the learner's place


@pytest.mark.parametrize("attempt", WRONG)
def test_a_wrong_attempt_fails_naming_the_case(attempt):
    name, fn, case = WRONG[attempt]
    with pytest.raises(Mismatch) as e:
        check(name, fn, verbose=False)
    assert str(e.value).startswith(f"{name}: case '{case}': ") and "Hint: " in str(e.value), str(e.value)


def test_an_unwritten_function_is_reported_not_raised(capsys):
    def stub(*args):
        ...

    assert check("ipo", stub) is False
    assert "ipo: not written yet" in capsys.readouterr().out


def test_the_exercises_run_without_jupyter_from_a_file_of_answers(tmp_path, capsys):
    answers = tmp_path / "answers.py"
    answers.write_text("import torch\nimport torch.nn.functional as F\n\n"
                       "def dpo(pi_w, pi_l, ref_w, ref_l, beta):\n"
                       "    return F.softplus(-beta * ((pi_w - ref_w) - (pi_l - ref_l)))\n\n"
                       "def W(mean_pos, mean_neg, alpha):\n"
                       "    return torch.sigmoid(-(alpha * mean_pos + (1 - alpha) * mean_neg)).detach()\n")
    assert exercises.main([str(answers)]) == 1  # one right, one wrong
    out = capsys.readouterr().out
    assert "dpo: all 4 cases agree" in out and "W: case 'random pairs, alpha 0.66': the gradient with respect to " \
        "mean_pos is missing" in out and "1 of 2 written exercises agree with sso-mini (7 not written)" in out
    (tmp_path / "none.py").write_text("x = 1\n")
    assert exercises.main([str(tmp_path / "none.py")]) == 2
    capsys.readouterr()
    assert exercises.main(["--tasks"]) == 0
    tasks = capsys.readouterr().out
    assert all(f"{name}: " in tasks for name in EXERCISES)
