"""Metrics that compare a model under test with a reference model, and the gates on them.

Written for every gate: ``check`` compares the merged model with the unmerged PeftModel;
the quantize and export gates compare a quantized or exported model with the merged one.
A model enters as an ``nn.Module`` (a transformers causal LM, a PeftModel) or as a plain
``forward(input_ids) -> logits`` callable (an onnxruntime session wrapped in a function).

- :func:`run_prompts`: teacher-forced logits on a prompt set and a greedy continuation;
- :func:`compare`: two such runs → max/mean abs logit difference, KL divergence, top-1
  agreement, perplexity ratio, greedy-decode agreement;
- :func:`gate`: metrics against thresholds → the failures, in words; :func:`describe`: each
  number with its bound, or marked informational, for a log line;
- :func:`unit_roundoff`, :func:`probe_lambda`: the constants of the probe tolerance
  (``docs/validation.md`` derives it).

All arithmetic is float32 or float64 on CPU, one prompt at a time (no padding to get wrong).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

def gate_params(*, test: str, ref: str, greedy_tokens: int, greedy_prompts: int, defaults: dict,
                prefix: str = "gate: ", seed_help: str = "seed of the token-id prompts for a model without a "
                                                             "tokenizer") -> dict:
    """The parameters every gate declares (check, quantize, export): the prompts, greedy decoding and
    the five thresholds, with each stage's own defaults. ``test``/``ref`` name the two models compared
    (``"quantized"``, ``"merged"``); ``defaults`` says per threshold what applies when it is not set."""
    from .pipeline import Param

    return {
        "prompts": Param(list, None, help=f"{prefix}evaluation prompts, strings (need the model's tokenizer) or "
                                          "token-id lists (default: built-in text)"),
        "seed": Param(int, 0, help=prefix + seed_help),
        "greedy_tokens": Param(int, greedy_tokens, help=f"{prefix}tokens decoded greedily after a prompt"),
        "greedy_prompts": Param(int, greedy_prompts, help=f"{prefix}how many prompts (the first ones) are decoded "
                                                          "greedily"),
        "max_abs_diff": Param(float, None, help=f"{prefix}largest allowed logit difference "
                                                f"({defaults['max_abs_diff']})"),
        "max_kl": Param(float, None, help=f"{prefix}largest allowed mean KL({ref} || {test}), nats "
                                          f"({defaults['max_kl']})"),
        "min_top1": Param(float, None, help=f"{prefix}smallest allowed top-1 agreement ({defaults['min_top1']})"),
        "min_greedy": Param(float, None, help=f"{prefix}smallest allowed greedy agreement, mean matching prefix / "
                                              f"greedy_tokens ({defaults['min_greedy']})"),
        "max_ppl_ratio": Param(float, None, help=f"{prefix}largest allowed perplexity ratio {test} / {ref} "
                                                 f"({defaults['max_ppl_ratio']})"),
    }

# unit roundoff u = 2^-p (p significant bits, round to nearest): |fl(x) - x| <= u·|x| for
# every x in the normal range of the format.
UNIT_ROUNDOFF = {"F64": 2.0 ** -53, "F32": 2.0 ** -24, "BF16": 2.0 ** -8, "F16": 2.0 ** -11}
PROBE_FAILURE_PROBABILITY = 1e-15  # per (row, probe): a correct merge of 10^9 rows x probes fails with p < 1e-6

# Default logit thresholds by the merged model's dtype (what rounding W0 + ΔW to it costs).
# Measured (docs/validation.md): a correct bf16 merge of SmolLM2-135M + the demo LoRA gives max_abs_diff
# 0.17, kl_mean 4e-5, top-1 and greedy agreement 1.0, ppl_ratio 0.999; float16 and float32 far less.
DEFAULT_THRESHOLDS = {
    "F32": {"max_abs_diff": 1e-2, "max_kl": 1e-5, "min_top1": 0.99, "min_greedy": 0.9, "max_ppl_ratio": 1.001},
    "F16": {"max_abs_diff": 0.25, "max_kl": 1e-4, "min_top1": 0.95, "min_greedy": 0.5, "max_ppl_ratio": 1.01},
    "BF16": {"max_abs_diff": 1.0, "max_kl": 1e-3, "min_top1": 0.9, "min_greedy": 0.25, "max_ppl_ratio": 1.05},
}
# threshold name -> (metric it bounds, "max" | "min")
THRESHOLDS = {
    "max_abs_diff": ("max_abs_diff", "max"),
    "max_kl": ("kl_mean", "max"),
    "min_top1": ("top1_agreement", "min"),
    "min_greedy": ("greedy_agreement", "min"),
    "max_ppl_ratio": ("ppl_ratio", "max"),
}
THRESHOLD_PARAMS = tuple(THRESHOLDS)  # the stage parameters every gate declares


def unit_roundoff(dtype) -> float:
    """u of a safetensors dtype string or a torch dtype (bfloat16: 2^-8, float16: 2^-11, float32: 2^-24)."""
    if not isinstance(dtype, str):
        dtype = {"torch.float64": "F64", "torch.float32": "F32", "torch.bfloat16": "BF16",
                 "torch.float16": "F16"}[str(dtype)]
    return UNIT_ROUNDOFF[dtype]


def probe_lambda(failure_probability: float = PROBE_FAILURE_PROBABILITY) -> float:
    """Hoeffding's multiplier: for a sum of independent zero-mean terms bounded by ±b_j,
    P(|sum| >= λ·sqrt(Σ b_j²)) <= 2·exp(-λ²/2); this returns λ for the given probability."""
    return math.sqrt(2.0 * math.log(2.0 / failure_probability))


def mean_square_bound(probes: int, failure_probability: float = PROBE_FAILURE_PROBABILITY) -> float:
    """The bound s on the mean of z² over all rows and ``probes`` independent probes, where each
    z is sub-Gaussian with variance proxy 1: P(mean >= s) <= exp(-(k/2)·(s - 1 - ln s)).

    (E exp(t·z²) <= (1 - 2t)^(-1/2) for a sub-Gaussian z; the mean over rows keeps that bound by
    convexity, whatever the rows' dependence; the k probes are independent; Chernoff with the
    best t = (1 - 1/s)/2.) Solved for s by bisection.
    """
    target = 2.0 * math.log(1.0 / failure_probability) / probes
    lo, hi = 1.0, 1.0 + 4 * target + 10
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid - 1 - math.log(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def thresholds_for(dtype: str, overrides: dict | None = None) -> dict:
    """The default thresholds of a merged dtype (safetensors string), with ``overrides`` (None: keep)."""
    out = dict(DEFAULT_THRESHOLDS.get(dtype, DEFAULT_THRESHOLDS["BF16"]))
    out.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return out


# --------------------------------------------------------------------------- running a model


@dataclass
class PromptRun:
    """What one model did on a prompt set: per prompt, float32 logits [T, V] and greedy tokens."""

    logits: list = field(default_factory=list)
    greedy: list = field(default_factory=list)


def _forward(model):
    """``ids [1, T] -> logits [1, T, V]`` for a module or a callable."""
    import torch

    if isinstance(model, torch.nn.Module):
        return lambda ids: model(input_ids=ids).logits
    return model


def greedy_decode(model, ids, n: int) -> list[int]:
    """The ``n`` tokens a model picks greedily after ``ids`` ([1, T] long tensor).

    A transformers module decodes with its KV cache; a callable is run on the whole
    sequence at each step (what an exported graph without cache inputs needs).
    """
    import torch

    if n <= 0:
        return []
    out = []
    with torch.no_grad():
        if isinstance(model, torch.nn.Module):
            result = model(input_ids=ids, use_cache=True)
            past = result.past_key_values
            nxt = result.logits[0, -1].float().argmax()
            for _ in range(n - 1):
                out.append(int(nxt))
                result = model(input_ids=nxt.view(1, 1), past_key_values=past, use_cache=True)
                past = result.past_key_values
                nxt = result.logits[0, -1].float().argmax()
            out.append(int(nxt))
            return out
        seq = ids
        for _ in range(n):
            nxt = model(seq)[0, -1].float().argmax()
            out.append(int(nxt))
            seq = torch.cat([seq, nxt.view(1, 1).to(seq.dtype)], dim=1)
    return out


def run_prompts(model, prompts: list[list[int]], greedy_tokens: int = 16,
                greedy_prompts: int | None = None) -> PromptRun:
    """Teacher-forced logits (float32) on each prompt, and ``greedy_tokens`` greedy tokens after each
    of the first ``greedy_prompts`` prompts (all when None)."""
    import torch

    forward = _forward(model)
    run = PromptRun()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], dtype=torch.long)
            run.logits.append(forward(ids)[0].float())
            if greedy_prompts is None or i < greedy_prompts:
                run.greedy.append(greedy_decode(model, ids, greedy_tokens))
    return run


# --------------------------------------------------------------------------- comparing


def kl_divergence(ref, test):
    """KL(P_ref || P_test) per position (nats), for logits [N, V]; computed in float64."""
    import torch

    lp = torch.log_softmax(ref.double(), dim=-1)
    lq = torch.log_softmax(test.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def perplexity(logits, prompts: list[list[int]]) -> float:
    """exp(mean next-token NLL) over every prompt's own tokens (teacher forcing)."""
    import torch

    nll, count = 0.0, 0
    for lg, prompt in zip(logits, prompts):
        if len(prompt) < 2:
            continue
        targets = torch.tensor(prompt[1:], dtype=torch.long)
        nll += float(torch.nn.functional.cross_entropy(lg[:-1].double(), targets, reduction="sum"))
        count += len(prompt) - 1
    return math.exp(nll / count) if count else float("nan")


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(ref: PromptRun, test: PromptRun, prompts: list[list[int]]) -> dict:
    """The metrics of ``test`` against ``ref`` on the same prompts (all positions of all prompts)."""
    import torch

    a, b = torch.cat(ref.logits), torch.cat(test.logits)
    diff = (a - b).abs()
    kl = kl_divergence(a, b)
    ppl_ref, ppl_test = perplexity(ref.logits, prompts), perplexity(test.logits, prompts)
    n = max((len(g) for g in ref.greedy), default=0)
    prefixes = [common_prefix(x, y) for x, y in zip(ref.greedy, test.greedy)]
    return {
        "prompts": len(prompts),
        "positions": int(a.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": float(a.abs().max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        "ppl_ref": ppl_ref,
        "ppl_test": ppl_test,
        "ppl_ratio": ppl_test / ppl_ref if ppl_ref > 0 else float("nan"),
        "greedy_tokens": n,
        "greedy_agreement": (sum(prefixes) / (n * len(prefixes))) if n and prefixes else 1.0,
        "greedy_exact": (sum(p == n for p in prefixes) / len(prefixes)) if prefixes else 1.0,
    }


def _limit(metric: str, thresholds: dict):
    """(limit, "max" | "min") that ``thresholds`` put on ``metric`` (``kl_mean``, ``logits_kl_mean``,
    ``decode_max_abs_diff``...), or None: the number is informational."""
    plain = metric.removeprefix("logits_")
    if plain == "decode_max_abs_diff":  # each decode step is held to the prefill's bound
        plain = "max_abs_diff"
    for name, (m, kind) in THRESHOLDS.items():
        if m == plain and thresholds.get(name) is not None:
            return thresholds[name], kind
    return None


def bound(metric: str, thresholds: dict) -> str | None:
    """``"<= 0.02"`` / ``">= 0.85"``: the bound a gate puts on ``metric``; None when it is informational."""
    limit = _limit(metric, thresholds)
    return None if limit is None else f"{'<=' if limit[1] == 'max' else '>='} {limit[0]:g}"


def describe(values: dict, thresholds: dict, names) -> str:
    """The gated numbers with their bounds, then the informational ones (measured, not gated):
    ``"kl_mean 0.0012 (<= 0.02), top1_agreement 0.97 (>= 0.95); informational, not gated: greedy_agreement 0.46"``;
    a gated number outside its bound (or NaN) reads ``(outside <= 0.02)``."""
    gated, info = [], []
    for name in names:
        value = values.get(name)
        if not isinstance(value, (int, float)):
            continue
        limit = _limit(name, thresholds)
        if limit is None:
            info.append(f"{name} {value:.4g}")
            continue
        ok = value <= limit[0] if limit[1] == "max" else value >= limit[0]
        gated.append(f"{name} {value:.4g} ({'' if ok else 'outside '}{bound(name, thresholds)})")
    return ", ".join(gated) + (("; " if gated else "") + "informational, not gated: " + ", ".join(info) if info else "")


def gate(metrics: dict, thresholds: dict) -> list[str]:
    """Each threshold ``metrics`` fails, in words (``"kl_mean 0.03 > max_kl 0.001"``); [] when all pass.
    A metric that is NaN fails its threshold."""
    failures = []
    for name, limit in thresholds.items():
        if limit is None or name not in THRESHOLDS:
            continue
        metric, kind = THRESHOLDS[name]
        value = metrics.get(metric)
        if value is None:
            continue
        ok = value <= limit if kind == "max" else value >= limit
        if not ok or value != value:
            failures.append(f"{metric} {value:.4g} {'>' if kind == 'max' else '<'} {name} {limit:g}")
    return failures
