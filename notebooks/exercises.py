"""Exercises that check themselves: write a piece of SSO, then `check("name", your_function)`.

Every exercise says what to write (`task`), then runs your function and sso-mini's own on the same
inputs, random ones and the edge cases a wrong answer trips on, comparing values and, for the
losses, gradients. It says how many cases agree, or stops at the first that does not, naming the
case and the largest difference, with a hint. The tests run every exercise with the library's
function in your place, so none can drift from the code.

    from exercises import check, task
    print(task("ipo"))
    def ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta): ...   # your code
    check("ipo", ipo)

A function whose body is still `...` (it returns None) is reported as not written yet.
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from sso_mini.batches import collate, record_sequences
from sso_mini.losses import N_CHOSEN, REJECTED, dpo_loss, ipo_loss, sso_loss, steering_terms, weight_W
from sso_mini.model import KVCache, attend
from sso_mini.tokenizer import prompt_ids

F64 = torch.float64


@dataclass(frozen=True)
class Exercise:
    task: str  # what to write, with the signature
    hint: str
    reference: object  # sso-mini's function in the exercise's signature
    cases: object  # () -> [(case name, inputs)]
    gradients: bool = True  # also compare the gradient of the output's sum w.r.t. every float input


class Mismatch(AssertionError):
    """The first case where the function disagrees with sso-mini's."""


# --- cases ---------------------------------------------------------------------------------------


def _logps(B, seed):
    """[B, 6] summed log-probs of a policy and a nearby reference, and the response lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (B, 6), generator=g).to(F64)
    policy = -lengths * (0.5 + torch.rand(B, 6, generator=g, dtype=F64))  # about -1 nat per token
    return policy, policy + 0.3 * torch.randn(B, 6, generator=g, dtype=F64), lengths


def _pair_cases(with_lengths, beta):
    policy, ref, lengths = _logps(8, 0)
    equal = lengths[:, 0]
    one = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    cases = [("random pairs, responses of equal length", (policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], equal,
                                                          equal)),
             ("random pairs, responses of different lengths", (policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                                                               lengths[:, 0], lengths[:, 1])),
             ("policy equal to the reference", (policy[:, 0], policy[:, 1], policy[:, 0], policy[:, 1],
                                                lengths[:, 0], lengths[:, 1])),
             ("a very wrong pair (margin -20000)", (one(-20000.0), one(0.0), one(0.0), one(0.0), one(10.0), one(10.0)))]
    return [(name, (*x, beta) if with_lengths else (*x[:4], beta)) for name, x in cases]


def _weight_cases():
    g = torch.Generator().manual_seed(1)
    pos, neg = -3 * torch.rand(16, generator=g, dtype=F64), -3 * torch.rand(16, generator=g, dtype=F64)
    likely = torch.full((2,), -1e-3, dtype=F64)
    return [("random pairs, alpha 0.66", (pos, neg, 0.66)), ("alpha 1: y+ alone", (pos, neg, 1.0)),
            ("alpha 0: y- alone", (pos, neg, 0.0)), ("very likely pairs", (likely, likely, 0.66))]


def _steering_cases():
    policy, ref, lengths = _logps(8, 2)
    unlike = policy.clone()
    unlike[:, N_CHOSEN] = policy[:, REJECTED] - 5.0  # y^o far from y-: a G- built on the wrong column shows
    return [("random records", (policy / lengths, ref / lengths, 0.2)),
            ("y^o unlike y-", (unlike / lengths, ref / lengths, 0.2)),
            ("policy equal to the reference", (policy / lengths, policy / lengths, 0.2))]


def _sso_cases():
    policy, ref, lengths = _logps(8, 3)
    long = lengths.clone()
    long[:, 0] *= 3  # a long y+ under x: means and sums part ways
    return [(f"random records, use_w={w}, use_g={g}", (policy, ref, lengths, w, g))
            for w in (True, False) for g in (True, False)] + [
        ("a long y+, use_w=True, use_g=True", (policy * long / lengths, ref * long / lengths, long, True, True))]


def _generator_cases():
    policy, ref, lengths = _logps(8, 4)
    return [(f"random records, terms {t}", (policy, ref, lengths, 0.1, t))
            for t in (("pos", "neg"), ("pos",), ("neg",))] + [("gamma 1", (policy, ref, lengths, 1.0, ("pos", "neg")))]


RECORD = {"prompt": "Name a fruit.", "system": "", "p_system": "Answer in one word.", "n_system": "Answer at length.",
          "chosen": "Apple.", "rejected": "There are many fruits, for example the apple.", "raw": "An apple."}


@lru_cache(maxsize=None)
def _tokenizer():
    from sso_mini.checkpoint import DEFAULT_MODEL, resolve
    from sso_mini.tokenizer import Tokenizer

    return Tokenizer.from_folder(resolve(DEFAULT_MODEL))


def _sequence_cases():
    tok = _tokenizer()
    tools = (lambda system, user: prompt_ids(tok, system, user), tok.encode, 2)  # 2: SmolLM2's end of turn
    return [("a record of finished answers", (RECORD, *tools)),
            ("y+ capped at the token limit", ({**RECORD, "capped": {"chosen": True}}, *tools)),
            ("y^o capped, y- finished", ({**RECORD, "capped": {"raw": True, "rejected": False}}, *tools))]


def _mask_cases():
    g = torch.Generator().manual_seed(5)
    seq = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    return [("one sequence", ([(seq(5), seq(3))], 0)),
            ("sequences of different lengths", ([(seq(5), seq(3)), (seq(2), seq(7)), (seq(9), seq(1))], 0)),
            ("pad id 2, a one-token prompt", ([(seq(1), seq(4)), (seq(6), seq(6))], 2))]


def _decode_cases():
    g = torch.Generator().manual_seed(6)
    B, H, S, D = 2, 3, 8, 4
    cases = []
    for pos in (0, 3, S - 1):
        k_cache, v_cache = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)  # stale after pos
        q, k, v = (torch.randn(B, H, 1, D, generator=g) for _ in range(3))
        cases.append((f"the step at slot {pos} of {S}, stale values after it", (q, k, v, k_cache, v_cache, pos)))
    return cases


# --- sso-mini's functions, in the exercises' signatures --------------------------------------------


def _ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    return ipo_loss(pi_w / len_w, pi_l / len_l, ref_w / len_w, ref_l / len_l, beta)


def _steering(l_pi, l_ref, beta):
    return sum(steering_terms(l_pi, l_ref, ipo_loss, beta))


def _decode_step(q, k, v, k_cache, v_cache, pos):
    cache = KVCache(k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), k_cache.dtype, k_cache.device)
    cache.k.copy_(k_cache)
    cache.v.copy_(v_cache)
    keys, values = cache.update(torch.tensor([pos]), k, v)
    k_cache.copy_(keys)
    v_cache.copy_(values)
    return attend(q, keys, values, (torch.arange(k_cache.size(2)) <= pos).view(1, 1, 1, -1))


EXERCISES = {
    "ipo": Exercise(
        "ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta) -> [B]: the IPO loss of each pair. The log-probs are "
        "SUMMED over each response's tokens (w: chosen, l: rejected; pi: policy, ref: reference); len_* count "
        "the tokens.",
        "IPO compares per-token means: divide each summed log-prob by its length, then (h - 1/(2 beta))^2 with "
        "h = (pi_w - ref_w) - (pi_l - ref_l).", _ipo, lambda: _pair_cases(True, 0.2)),
    "dpo": Exercise(
        "dpo(pi_w, pi_l, ref_w, ref_l, beta) -> [B]: the DPO loss of each pair, on summed log-probs.",
        "-log sigmoid(beta * h); for a very negative margin sigmoid underflows to 0: use "
        "torch.nn.functional.logsigmoid.", dpo_loss, lambda: _pair_cases(False, 0.1)),
    "W": Exercise(
        "W(mean_pos, mean_neg, alpha) -> [B]: SSO's weight, from the policy's per-token-mean log-probs of y+ and "
        "y- under the plain prompt x.",
        "sigmoid(-(alpha * mean_pos + (1 - alpha) * mean_neg)), kept in the graph (no .detach()): its gradient "
        "is half of what W does.", weight_W, _weight_cases),
    "G": Exercise(
        "G(l_pi, l_ref, beta) -> [B]: the self-steering term with IPO, L(x+: y+ > y-) + L(x-: y^o > y+). l_pi and "
        "l_ref are [B, 6] per-token means in the columns chosen (y+|x), rejected (y-|x), p_chosen (y+|x+), "
        "p_rejected (y-|x+), n_chosen (y^o|x-), n_rejected (y+|x-).",
        "Under x- the plain answer y^o is chosen and y+ rejected (columns 4 and 5), not y- over y+.",
        _steering, _steering_cases),
    "sso_loss": Exercise(
        "sso_loss(policy, ref, lengths, use_w, use_g) -> scalar: the batch mean of SSO's v1 loss "
        "W * (L(x: y+ > y-) + theta * G) with IPO (beta 0.2), theta 0.1, alpha 0.66, on [B, 6] SUMMED "
        "log-probs and lengths in the columns above; use_w=False drops W, use_g=False drops G.",
        "Per-token means for IPO and for W; w/o W is L + theta G, w/o G is W * L, neither is L (PBAA).",
        lambda policy, ref, lengths, use_w, use_g: sso_loss(policy, ref, lengths, use_w=use_w, use_g=use_g)[0],
        _sso_cases),
    "sequences": Exercise(
        "sequences(record, prompt_ids, encode, eot) -> the six (prompt ids, response ids) of a record, in the "
        "columns above. prompt_ids(system, user) gives a prompt's ids (system '' for the plain x); encode(text) "
        "a response's; the end-of-turn id eot ends every response whose record['capped'][key] is not true.",
        "(x: y+), (x: y-), (x+: y+), (x+: y-), (x-: y^o), (x-: y+), with x+ / x- from p_system / n_system; a capped "
        "response is a prefix the model never ended, so it gets no eot.",
        lambda record, prompt, encode, eot: record_sequences(_tokenizer(), record, eot=eot), _sequence_cases,
        gradients=False),
    "masks": Exercise(
        "masks(sequences, pad_id) -> dict of input_ids, attention_mask, response_mask, each [N, T]: the (prompt, "
        "response) token lists right-padded to the longest, attention_mask 1 on real tokens, response_mask True "
        "on the response tokens (the ones the loss scores).",
        "Row i is prompt + response, then pad_id; response_mask starts at len(prompt), not one before or after.",
        collate, _mask_cases, gradients=False),
    "decode_step": Exercise(
        "decode_step(q, k, v, k_cache, v_cache, pos) -> [B, H, 1, D]: write this step's k and v ([B, H, 1, D]) into "
        "slot pos of the caches ([B, H, S, D], in place), then attend q over slots 0..pos.",
        "Write the cache first, then mask every slot after pos (the cache holds stale values there); scaled dot "
        "product attention divides by sqrt(D).", _decode_step, _decode_cases, gradients=False),
    "generator_loss": Exercise(
        "generator_loss(policy, ref, lengths, gamma, terms) -> scalar: v2's data-generator loss, the batch mean of "
        "L+ + L- with DPO (beta 0.1) on [B, 6] summed log-probs: L+ = L(x+: y+ > y-) + gamma SFT(x+, y+), "
        "L- = L(x-: y^o > y+) + gamma SFT(x-, y^o); terms keeps 'pos' (L+), 'neg' (L-) or both.",
        "SFT is minus the chosen side's per-token MEAN log-prob; there is no W and no base term on x.",
        lambda policy, ref, lengths, gamma, terms: sso_loss(policy, ref, lengths, loss_type="dpo", form="generator",
                                                            gamma=gamma, terms=terms)[0], _generator_cases),
}


def task(name: str) -> str:
    e = EXERCISES[name]
    return f"{name}: {e.task}"


# --- the check --------------------------------------------------------------------------------------


def _copy(x):
    return x.clone() if torch.is_tensor(x) else x


def _run(fn, inputs, gradients):
    """fn's output and, with gradients, d(sum of output)/d(every float tensor input) (None where unused)."""
    inputs = [_copy(x) for x in inputs]  # in-place writes (the KV cache) stay within one call
    leaves = [x.requires_grad_(True) if gradients and torch.is_tensor(x) and x.is_floating_point() else x
              for x in inputs]
    out = fn(*leaves)
    if not gradients or out is None:
        return out, None
    tensors = [x for x in leaves if torch.is_tensor(x) and x.requires_grad]
    out = torch.as_tensor(out)
    grads = torch.autograd.grad(out.sum(), tensors, allow_unused=True) if out.requires_grad else [None] * len(tensors)
    return out.detach(), grads


def _difference(got, want) -> float:
    got, want = torch.as_tensor(got).to(F64), torch.as_tensor(want).to(F64)
    if got.shape != want.shape:
        return math.inf
    return (got - want).abs().nan_to_num(nan=math.inf).max().item() if want.numel() else 0.0


def _same(got, want, tol) -> tuple[bool, str]:
    """Whether got equals want (tensors within tol, relative to want's size; lists exactly), and how it differs."""
    if isinstance(want, dict):
        for key in want:
            ok, why = _same(got.get(key) if isinstance(got, dict) else None, want[key], tol)
            if not ok:
                return False, f"{key}: {why}"
        return True, ""
    if isinstance(want, (list, tuple)) and not torch.is_tensor(want):
        if isinstance(got, (list, tuple)) and len(got) == len(want) and all(_same(g, w, tol)[0]
                                                                            for g, w in zip(got, want)):
            return True, ""
        return False, f"expected {want}, got {got}"
    if got is None:
        return False, "nothing was returned"
    if not torch.is_tensor(want):
        return (got == want, f"expected {want}, got {got}")
    d, scale = _difference(got, want), want.to(F64).abs().max().item() if want.numel() else 0.0
    if d <= tol * (1 + scale):
        return True, ""
    shape = "" if torch.as_tensor(got).shape == want.shape else (
        f" (shape {tuple(torch.as_tensor(got).shape)}, expected {tuple(want.shape)})")
    return False, f"largest difference {d:.3g}{shape}"


def check(name: str, fn, tol: float = 1e-6, verbose: bool = True) -> bool:
    """Compare fn with sso-mini's function on every case of exercise `name`. Returns True when all agree,
    False when fn is not written yet; raises Mismatch, naming the first case that differs."""
    e = EXERCISES[name]
    cases = e.cases()
    for case, inputs in cases:
        want, want_grads = _run(e.reference, inputs, e.gradients)
        got, got_grads = _run(fn, inputs, e.gradients)
        if got is None and case == cases[0][0]:
            if verbose:
                print(f"{name}: not written yet (the function returned None)")
            return False
        ok, why = _same(got, want, tol)
        if ok and e.gradients:
            for i, (g, w) in enumerate(zip(got_grads, want_grads)):
                if (g is None) != (w is None):
                    ok, why = False, (f"the gradient with respect to input {i + 1} is "
                                      f"{'missing (is something detached?)' if g is None else 'not zero'}")
                elif g is not None:
                    ok, why = _same(g, w, tol)
                    why = f"the gradient with respect to input {i + 1}: {why}"
                if not ok:
                    break
        if not ok:
            raise Mismatch(f"{name}: case '{case}': {why}. Hint: {e.hint}")
    if verbose:
        print(f"{name}: all {len(cases)} cases agree with sso-mini's function")
    return True


def hint(name: str) -> str:
    return f"{name}: {EXERCISES[name].hint}"
