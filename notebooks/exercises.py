"""Exercises that check themselves: write a piece of SSO, then `check("name", your_function)`.

Every exercise says what to write (`task`), then runs your function and sso-mini's own on the same
inputs, random ones and the edge cases a wrong answer trips on, comparing values and, for the
losses, the gradients a correct answer must carry (those of the policy's log-probs; a reference
you detach is fine). It says how many cases agree, or stops at the first that does not, naming the
case, the argument and the largest difference, with a hint; `hint(name, 2)` and `hint(name, 3)` give
more. The tests run every exercise with the library's function in your place, so none can drift
from the code.

    from exercises import check, task
    print(task("ipo"))
    def ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta): ...   # your code
    check("ipo", ipo)

Without Jupyter: write the functions, named as the exercises (ipo, dpo, W, G, sso_loss, generator_loss,
sequences, masks, decode_step), in a file of your own and run `python notebooks/exercises.py my_answers.py`;
`python notebooks/exercises.py --tasks` prints every task.

A function whose body is still `...` (it returns None) is reported as not written yet.
"""

import importlib.util
import math
import sys
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's sso_mini, also when run as a script
from sso_mini.batches import collate, record_sequences  # noqa: E402
from sso_mini.losses import N_CHOSEN, REJECTED, dpo_loss, ipo_loss, sso_loss, steering_terms, weight_W  # noqa: E402
from sso_mini.model import KVCache, attend  # noqa: E402
from sso_mini.tokenizer import prompt_ids  # noqa: E402

F64 = torch.float64


@dataclass(frozen=True)
class Exercise:
    task: str  # what to write, with the signature
    hints: tuple  # from a nudge to the formula
    reference: object  # sso-mini's function in the exercise's signature
    cases: object  # () -> [(case name, inputs)]
    args: tuple  # the function's argument names, to name them in messages
    graded: tuple = ()  # arguments whose gradient a correct answer carries (the policy's log-probs, W's inputs)
    in_place: tuple = ()  # arguments the function must update in place (the KV cache)
    explain: object = None  # (got, want) -> where they differ, for outputs a difference number cannot describe


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


# batches.SEQUENCES, as the paper writes them
SEQUENCE_NAMES = ("x: y+", "x: y-", "x+: y+", "x+: y-", "x-: y^o", "x-: y+")


def _explain_sequences(got, want) -> str:
    """The first of the six (prompt, response) pairs that differs, shown as text."""
    if not isinstance(got, (list, tuple)) or len(got) != 6:
        return f"expected a list of 6 (prompt ids, response ids) pairs, got {type(got).__name__} of {len(got)}" \
            if isinstance(got, (list, tuple)) else f"expected a list of 6 pairs, got {type(got).__name__}"
    tok = _tokenizer()
    for name, g, w in zip(SEQUENCE_NAMES, got, want):
        for part, gi, wi in zip(("prompt", "response"), g, w):
            if list(gi) != list(wi):
                text = lambda ids: repr(tok.decode(list(ids), skip_special_tokens=False)[-120:])  # noqa: E731
                return f"sequence {name}: its {part} is {text(gi)}, expected {text(wi)}"
    return ""


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


PAIR_ARGS = ("pi_w", "pi_l", "ref_w", "ref_l")
EXERCISES = {
    "ipo": Exercise(
        "ipo(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta) -> [B]: the IPO loss of each pair. The log-probs are "
        "SUMMED over each response's tokens (w: chosen, l: rejected; pi: policy, ref: reference); len_* count "
        "the tokens.",
        ("IPO compares per-token means, so that a long answer does not weigh more than a short one.",
         "Divide each summed log-prob by its own length first.",
         "h = (pi_w/len_w - ref_w/len_w) - (pi_l/len_l - ref_l/len_l); the loss is (h - 1/(2 beta))^2."),
        _ipo, lambda: _pair_cases(True, 0.2), (*PAIR_ARGS, "len_w", "len_l", "beta"), graded=("pi_w", "pi_l")),
    "dpo": Exercise(
        "dpo(pi_w, pi_l, ref_w, ref_l, beta) -> [B]: the DPO loss of each pair, on summed log-probs.",
        ("DPO works on the summed log-probs as they are (no division by lengths).",
         "The loss is -log sigmoid(beta * h), h = (pi_w - ref_w) - (pi_l - ref_l).",
         "For a very negative margin sigmoid underflows to 0 and log gives inf: use "
         "torch.nn.functional.logsigmoid (or softplus(-beta * h))."),
        dpo_loss, lambda: _pair_cases(False, 0.1), (*PAIR_ARGS, "beta"), graded=("pi_w", "pi_l")),
    "W": Exercise(
        "W(mean_pos, mean_neg, alpha) -> [B]: SSO's weight, from the policy's per-token-mean log-probs of y+ and "
        "y- under the plain prompt x.",
        ("alpha weighs y+, 1 - alpha weighs y-.",
         "W = sigmoid(-(alpha * mean_pos + (1 - alpha) * mean_neg)).",
         "Keep W in the graph (no .detach()): its gradient is what raises log pi(y+|x) and log pi(y-|x), "
         "pulling the pair towards what the policy writes."),
        weight_W, _weight_cases, ("mean_pos", "mean_neg", "alpha"), graded=("mean_pos", "mean_neg")),
    "G": Exercise(
        "G(l_pi, l_ref, beta) -> [B]: the self-steering term with IPO, L(x+: y+ > y-) + L(x-: y^o > y+). l_pi and "
        "l_ref are [B, 6] per-token means in the columns chosen (y+|x), rejected (y-|x), p_chosen (y+|x+), "
        "p_rejected (y-|x+), n_chosen (y^o|x-), n_rejected (y+|x-).",
        ("G is two IPO losses added: one pair under x+, one under x-; the plain x's pair is not in G.",
         "Under x+ the pair is columns 2 (chosen) and 3 (rejected).",
         "Under x- the plain answer y^o is chosen and y+ rejected: columns 4 and 5, not y- over y+."),
        _steering, _steering_cases, ("l_pi", "l_ref", "beta"), graded=("l_pi",)),
    "sso_loss": Exercise(
        "sso_loss(policy, ref, lengths, use_w, use_g) -> scalar: the batch mean of SSO's v1 loss "
        "W * (L(x: y+ > y-) + theta * G) with IPO (beta 0.2), theta 0.1, alpha 0.66, on [B, 6] SUMMED "
        "log-probs and lengths in the columns above; use_w=False drops W, use_g=False drops G.",
        ("Work on per-token means (policy / lengths, ref / lengths): IPO and W both read them.",
         "L is IPO on columns 0 and 1, G as in the G exercise, W from the policy's means of columns 0 and 1.",
         "w/o W is L + theta G, w/o G is W * L, neither is L (PBAA); then the mean over the batch."),
        lambda policy, ref, lengths, use_w, use_g: sso_loss(policy, ref, lengths, use_w=use_w, use_g=use_g)[0],
        _sso_cases, ("policy", "ref", "lengths", "use_w", "use_g"), graded=("policy",)),
    "sequences": Exercise(
        "sequences(record, prompt_ids, encode, eot) -> the six (prompt ids, response ids) of a record, in the "
        "columns above. prompt_ids(system, user) gives a prompt's ids (system '' for the plain x); encode(text) "
        "a response's; the end-of-turn id eot ends every response that is not capped: record.get('capped', {}) "
        "maps a response's key (chosen, rejected, raw) to True when it hit the token cap (a missing key: not).",
        ("Three prompts (x, x+ from p_system, x- from n_system), each with two responses.",
         "The order: (x: y+), (x: y-), (x+: y+), (x+: y-), (x-: y^o), (x-: y+).",
         "A capped response is a prefix the model never ended, so it gets no eot; every other one ends with it."),
        lambda record, prompt, encode, eot: record_sequences(_tokenizer(), record, eot=eot), _sequence_cases,
        ("record", "prompt_ids", "encode", "eot"), explain=_explain_sequences),
    "masks": Exercise(
        "masks(sequences, pad_id) -> dict of input_ids, attention_mask, response_mask, each [N, T]: the (prompt, "
        "response) token lists right-padded to the longest, attention_mask 1 on real tokens (int64), "
        "response_mask True on the response tokens (the ones the loss scores; bool).",
        ("Row i is prompt + response, then pad_id up to the longest row.",
         "attention_mask is 1 wherever a real token is, an int64 tensor.",
         "response_mask is a bool tensor, True from len(prompt) to len(prompt) + len(response), not one before "
         "or after."),
        collate, _mask_cases, ("sequences", "pad_id")),
    "decode_step": Exercise(
        "decode_step(q, k, v, k_cache, v_cache, pos) -> [B, H, 1, D]: write this step's k and v ([B, H, 1, D]) into "
        "slot pos of the caches ([B, H, S, D], in place), then attend q over slots 0..pos.",
        ("The caches are the model's memory for the next steps: write into them (k_cache[:, :, pos] = ...), do "
         "not build new tensors.",
         "Then attend over the whole cache with every slot after pos masked: it holds stale values.",
         "softmax(q k^T / sqrt(D)) v, or F.scaled_dot_product_attention with a boolean mask of slots <= pos."),
        _decode_step, _decode_cases, ("q", "k", "v", "k_cache", "v_cache", "pos"), in_place=("k_cache", "v_cache")),
    "generator_loss": Exercise(
        "generator_loss(policy, ref, lengths, gamma, terms) -> scalar: v2's data-generator loss, the batch mean of "
        "L+ + L- with DPO (beta 0.1) on [B, 6] summed log-probs: L+ = L(x+: y+ > y-) + gamma SFT(x+, y+), "
        "L- = L(x-: y^o > y+) + gamma SFT(x-, y^o); terms keeps 'pos' (L+), 'neg' (L-) or both.",
        ("There is no W and no base term on x: only the pairs under x+ and x-.",
         "DPO on the summed log-probs, as in the dpo exercise, for columns (2, 3) and (4, 5).",
         "SFT is minus the chosen side's per-token MEAN log-prob: policy[:, c] / lengths[:, c]."),
        lambda policy, ref, lengths, gamma, terms: sso_loss(policy, ref, lengths, loss_type="dpo", form="generator",
                                                            gamma=gamma, terms=terms)[0], _generator_cases,
        ("policy", "ref", "lengths", "gamma", "terms"), graded=("policy",)),
}


def task(name: str) -> str:
    e = EXERCISES[name]
    return f"{name}: {e.task}"


# --- the check --------------------------------------------------------------------------------------


def _copy(x):
    return x.clone() if torch.is_tensor(x) else x


def _run(fn, inputs, e: Exercise):
    """fn's output, the gradient of its sum with respect to each graded argument (None where it has none), and
    the in-place arguments as fn left them."""
    inputs = [_copy(x) for x in inputs]  # in-place writes (the KV cache) stay within one call
    for name, x in zip(e.args, inputs):
        if name in e.graded:
            x.requires_grad_(True)
    out = fn(*inputs)
    after = {name: x.detach() for name, x in zip(e.args, inputs) if name in e.in_place}
    if not e.graded or out is None:
        return out, None, after
    graded = [x for name, x in zip(e.args, inputs) if name in e.graded]
    out = torch.as_tensor(out)
    grads = torch.autograd.grad(out.sum(), graded, allow_unused=True) if out.requires_grad else [None] * len(graded)
    return out.detach(), grads, after


def _difference(got, want) -> float:
    got, want = torch.as_tensor(got).to(F64), torch.as_tensor(want).to(F64)
    if got.shape != want.shape:
        return math.inf
    return (got - want).abs().nan_to_num(nan=math.inf).max().item() if want.numel() else 0.0


def _same(got, want, tol) -> tuple[bool, str]:
    """Whether got equals want (tensors within tol, relative to want's size, bool and integer tensors in their
    dtype; lists exactly), and how it differs."""
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
    if not want.is_floating_point() and (not torch.is_tensor(got) or got.dtype != want.dtype):
        kind = f"a {got.dtype} tensor" if torch.is_tensor(got) else f"a {type(got).__name__}"
        return False, f"expected a {want.dtype} tensor, got {kind}"
    d, scale = _difference(got, want), want.to(F64).abs().max().item() if want.numel() else 0.0
    if d <= tol * (1 + scale):
        return True, ""
    shape = "" if torch.as_tensor(got).shape == want.shape else (
        f" (shape {tuple(torch.as_tensor(got).shape)}, expected {tuple(want.shape)})")
    return False, f"largest difference {d:.3g}{shape}"


def _where(error: Exception) -> str:
    """The line of the learner's code that raised (the last frame outside this file)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != __file__]
    return f" at line {frames[-1].lineno}: {frames[-1].line}" if frames and frames[-1].line else ""


def _compare(e: Exercise, got, want, tol) -> tuple[bool, str]:
    """Outputs, in-place arguments and graded gradients of one case: (agree, how they differ)."""
    (out, grads, after), (want_out, want_grads, want_after) = got, want
    ok, why = _same(out, want_out, tol)
    if not ok and e.explain is not None:
        why = e.explain(out, want_out) or why
    for name in e.in_place if ok else ():
        ok, why = _same(after[name], want_after[name], tol)
        why = f"{name} after the call (written in place?): {why}"
        if not ok:
            break
    for name, g, w in zip(e.graded, grads or (), want_grads or ()) if ok else ():
        if (g is None) != (w is None):
            ok, why = False, (f"the gradient with respect to {name} is "
                              f"{'missing (is something detached?)' if g is None else 'not zero'}")
        elif g is not None:
            ok, why = _same(g, w, tol)
            why = f"the gradient with respect to {name}: {why}"
        if not ok:
            break
    return ok, why


def check(name: str, fn, tol: float = 1e-6, verbose: bool = True) -> bool:
    """Compare fn with sso-mini's function on every case of exercise `name`. Returns True when all agree,
    False when fn is not written yet; raises Mismatch, naming the first case that differs (or that made fn
    raise)."""
    e = EXERCISES[name]
    cases = e.cases()
    for case, inputs in cases:
        want = _run(e.reference, inputs, e)
        try:
            got = _run(fn, inputs, e)
        except Exception as error:  # the learner's code: say which case and which line, not a bare traceback
            raise Mismatch(f"{name}: case '{case}': your function raised {type(error).__name__}: {error}"
                           f"{_where(error)}. Hint: {e.hints[0]}") from error
        if got[0] is None and case == cases[0][0]:
            if verbose:
                print(f"{name}: not written yet (the function returned None)")
            return False
        ok, why = _compare(e, got, want, tol)
        if not ok:
            raise Mismatch(f"{name}: case '{case}': {why}. Hint: {e.hints[0]} (more: hint({name!r}, 2))")
    if verbose:
        print(f"{name}: all {len(cases)} cases agree with sso-mini's function")
    return True


def hint(name: str, level: int = 1) -> str:
    """The exercise's first `level` hints, from a nudge to the formula."""
    hints = EXERCISES[name].hints
    return f"{name}: " + " ".join(hints[:max(1, min(level, len(hints)))])


def main(argv=None) -> int:
    """`python notebooks/exercises.py ANSWERS.py`: check every exercise ANSWERS.py defines a function for."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--tasks"]:
        print("\n\n".join(task(name) for name in EXERCISES))
        return 0
    if len(argv) != 1:
        print("usage: python notebooks/exercises.py ANSWERS.py | --tasks", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("answers", argv[0])
    answers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(answers)
    found = [name for name in EXERCISES if callable(getattr(answers, name, None))]
    if not found:
        print(f"error: {argv[0]} defines none of the exercises' functions ({', '.join(EXERCISES)})", file=sys.stderr)
        return 2
    passed = 0
    for name in found:
        try:
            passed += bool(check(name, getattr(answers, name)))
        except Mismatch as e:
            print(e)
    print(f"{passed} of {len(found)} written exercises agree with sso-mini ({len(EXERCISES) - len(found)} not written)")
    return 0 if passed == len(found) else 1


if __name__ == "__main__":
    sys.exit(main())
