"""The quality gate shared by ``quantize`` and ``export``: the compressed model against the merged one.

It reuses :mod:`stages.metrics` (the ``check`` stage's metrics): teacher-forced logits on a
fixed evaluation text, then max abs logit difference, KL divergence, top-1 agreement,
perplexity ratio and greedy-decode agreement, gated by thresholds. What this module adds:

- the evaluation prompts: the built-in evaluation text (one prompt per paragraph, through
  the model's tokenizer), the stage's ``prompts`` parameter (strings or token-id lists), or
  seeded token ids for a model without a tokenizer;
- default thresholds per stage and variant (:data:`QUANTIZE`, :data:`EXPORT`);
- :func:`failure_message`: one line with every failed threshold and the key numbers.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from ..findings import FuseError
from ..metrics import THRESHOLD_PARAMS

# Defaults. None: measured and recorded, not gated. Rationale and the numbers measured on the tiny
# test models and SmolLM2-135M are in docs/quantize-export.md. Logit differences of weight-only
# 4-bit models are dominated by a few outlier logits, so they are not gated by default: KL, top-1
# and perplexity say what a user would notice.
QUANTIZE = {
    8: {"max_abs_diff": None, "max_kl": 0.02, "min_top1": 0.95, "min_greedy": None, "max_ppl_ratio": 1.03},
    4: {"max_abs_diff": None, "max_kl": 0.15, "min_top1": 0.85, "min_greedy": None, "max_ppl_ratio": 1.15},
}
EXPORT = {
    # an exact export: ONNX Runtime's float32 kernels against torch's (the bound: 1e-3)
    "float32": {"max_abs_diff": 1e-3, "max_kl": 1e-6, "min_top1": 0.99, "min_greedy": 0.9, "max_ppl_ratio": 1.001},
    "float16": {"max_abs_diff": None, "max_kl": 1e-3, "min_top1": 0.97, "min_greedy": None, "max_ppl_ratio": 1.01},
    "int8": {"max_abs_diff": None, "max_kl": 0.02, "min_top1": 0.95, "min_greedy": None, "max_ppl_ratio": 1.03},
    "int4": {"max_abs_diff": None, "max_kl": 0.15, "min_top1": 0.85, "min_greedy": None, "max_ppl_ratio": 1.15},
}
ID_PROMPTS = (6, 16)  # token-id prompts for a model without a tokenizer: how many, how long
MAX_PROMPT_TOKENS = 256
KEY_METRICS = ("max_abs_diff", "kl_mean", "top1_agreement", "ppl_ratio", "greedy_agreement")


def thresholds(defaults: dict, params: dict) -> dict:
    """The defaults with the stage's threshold parameters (those set) on top."""
    out = dict(defaults)
    out.update({k: params[k] for k in THRESHOLD_PARAMS if params.get(k) is not None})
    return out


def eval_prompts(model_dir: Path, prompts, seed: int, vocab_size: int | None, *, key: str) -> tuple[list[list[int]], str]:
    """Token ids to evaluate on, and where they came from (see the module docstring)."""
    from .texts import eval_passages

    if prompts:
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompts):
            bad = [t for p in prompts for t in p if vocab_size and not 0 <= t < vocab_size]
            if bad:
                raise FuseError("F103", f"{key} holds token id {bad[0]}, outside the vocabulary of {vocab_size}",
                                key=key)
            if any(len(p) < 2 for p in prompts):
                raise FuseError("F103", f"{key}: a prompt needs at least 2 tokens", key=key)
            return [list(p) for p in prompts], f"{len(prompts)} token-id prompts from {key}"
        if not all(isinstance(p, str) and p for p in prompts):
            raise FuseError("F103", f"{key} must be a list of strings or a list of token-id lists", key=key)
        tok = tokenizer(model_dir)
        if tok is None:
            why = f" (its tokenizer files do not load: {_TOKENIZER_ERRORS[str(model_dir)]})" \
                if str(model_dir) in _TOKENIZER_ERRORS else ""
            raise FuseError("F103", f"{key} are strings, but the model has no tokenizer{why}", key=key,
                            fix="give token ids instead, e.g. [[1, 17, 42, 99]]")
        return _encode(tok, prompts), f"{len(prompts)} prompts from {key}"
    tok = tokenizer(model_dir)
    if tok is not None:
        ids = _encode(tok, eval_passages())
        if all(len(i) >= 2 for i in ids):
            return ids, f"built-in evaluation text ({len(ids)} passages, {sum(map(len, ids))} tokens)"
    rng = random.Random(seed)
    count, length = ID_PROMPTS
    return [[rng.randrange(int(vocab_size or 2)) for _ in range(length)] for _ in range(count)], \
        f"{count} seeded token-id prompts (no tokenizer)"


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t)["input_ids"][:MAX_PROMPT_TOKENS] for t in texts]


def tokenizer(model_dir: Path):
    """The model directory's tokenizer, or None when it has none (or an unreadable one)."""
    from .backend import TOKENIZER_FILES

    if not any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - an unreadable tokenizer: evaluate on token ids (and say why)
        _TOKENIZER_ERRORS[str(model_dir)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return None


_TOKENIZER_ERRORS: dict[str, str] = {}  # model dir -> why its tokenizer did not load


def rounded(metrics: dict) -> dict:
    """Floats to 4 significant digits (the manifest and the model card show these; the last digits
    of float sums are not worth a changed card); non-finite floats as strings (strict JSON)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float):
            out[k] = float(f"{v:.4g}") if math.isfinite(v) else str(v)
        else:
            out[k] = v
    return out


def failure_message(what: str, failures: list[str], metrics: dict) -> str:
    """``"<what> fails its quality gate: kl_mean 0.52 > max_kl 0.15; ... (max_abs_diff 3.1, kl_mean 0.52,
    top1_agreement 0.71, ppl_ratio 1.9, greedy_agreement 0.4)"``."""
    numbers = ", ".join(f"{k} {metrics[k]:.4g}" for k in KEY_METRICS if isinstance(metrics.get(k), (int, float)))
    return f"{what} fails its quality gate: " + "; ".join(failures) + (f" ({numbers})" if numbers else "")
