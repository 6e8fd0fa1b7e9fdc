"""Which token comes next: temperature, top-k, and the exponential race within the top-p nucleus.

Instead of torch.multinomial, a row's next token is argmax(probs / E) with E ~ Exp(1) drawn per token:
token i wins with probability probs[i], the draws for all rows come at once with fixed shapes, and a
seeded generator makes every row reproducible. A token outside the nucleus cannot win, so only a row's
NUCLEUS_CANDIDATES likeliest tokens race (`nucleus_race`), and the rare row whose nucleus is wider races
again over its whole vocabulary (`widen`). generate.py runs this once per decode step, compiled or not.
"""

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept), the rest -> -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def nucleus(ranked: torch.Tensor, p):
    """[b, k] probabilities, most likely first -> [b, k] True: in the top-p nucleus (the mass ranked
    above is still short of p, so the top token always stays), and [b] True: the nucleus ends
    within these k (their mass reaches p)."""
    cum = ranked.cumsum(dim=-1)
    return cum - ranked < p, cum[:, -1] >= p


def exponential_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Exp(1) draws, strictly positive (u is clamped away from 0; u < 1 always)."""
    u = torch.rand(shape, generator=generator, device=device)
    return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_()


NUCLEUS_CANDIDATES = 256  # tokens per row that race for the next token before a row widens to its whole vocabulary


def race_width(vocab_size: int, top_p: float) -> int:
    """Exp(1) draws per row and step: one per candidate when top-p is on, one per token when it is off."""
    return min(NUCLEUS_CANDIDATES, vocab_size) if top_p < 1.0 else vocab_size


def nucleus_race(probs: torch.Tensor, p, noise: torch.Tensor):
    """The exponential race within each row's top-p nucleus, among its noise.size(-1) most likely tokens:
    [B, V] probabilities, [B, k] Exp(1) draws -> [B] ids, [B] True where the race was decided (the
    nucleus lies within the k candidates; `widen` redoes the other rows over the whole vocabulary).

    argmax(probs / E) over the kept tokens, E ~ Exp(1): kept token i wins with probability
    probs[i] / (mass kept). Why candidates: a nucleus seldom holds more than a few dozen tokens, while
    sorting a 49k-152k vocabulary and drawing noise for every token of it is a visible share of a decode
    step (and, compiled, noise copied into the graph's input every step).
    p: a number, or a 0-d tensor (the compiled step's, so that its value is no part of the graph); the
    number 1.0 turns top-p off: every token races, unranked, and noise has one draw per token.
    """
    if not torch.is_tensor(p) and p >= 1.0:
        return (probs / noise).argmax(dim=-1), torch.ones(len(probs), dtype=torch.bool, device=probs.device)
    k = noise.size(-1)  # top and order: [B, k], most likely first (the whole row, as `widen` asks: a sort)
    top, order = probs.topk(k, dim=-1) if k < probs.size(-1) else probs.sort(dim=-1, descending=True)
    kept, decided = nucleus(top, p)
    score = (top / noise).masked_fill(~kept, -1.0)
    return order.gather(-1, score.argmax(dim=-1, keepdim=True))[:, 0], decided


def widen(token, decided, probs, p, generator: torch.Generator):
    """Rows whose nucleus outgrew their candidates race again over their whole vocabulary (eager, outside
    any compiled graph: a data-dependent batch). Same distribution as one race over every token."""
    if not bool(decided.all()):
        wide = probs[~decided]  # [b, V]
        token[~decided] = nucleus_race(wide, p, exponential_noise(wide.shape, generator, wide.device))[0]
    return token


def probabilities(logits, temperature, top_k: int):
    """[B, V] logits -> [B, V] fp32 probabilities after the temperature and the top-k filter."""
    return top_k_filter(logits.float() / temperature, top_k).softmax(dim=-1)


def sample(logits, generator: torch.Generator | None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Next token per row: [B, V] logits -> [B] ids. Temperature 0 is greedy (no generator needed);
    otherwise temperature, then top-k, then the race within the top-p nucleus, drawn from `generator`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k)
    noise = exponential_noise((len(probs), race_width(probs.size(-1), top_p)), generator, probs.device)
    return widen(*nucleus_race(probs, top_p, noise), probs, top_p, generator)
