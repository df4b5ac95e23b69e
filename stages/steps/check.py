"""Stage ``check``: the equivalence gate — does the merged model do what base + adapter did?

Two tests, cheap to dear (``docs/validation.md`` has the derivations):

1. **Probe, every tensor, streaming.** For each merged tensor ``Ŵ`` (read in row blocks,
   so memory does not grow with the model), random ±1 probe vectors ``x``:
   ``Ŵ·x`` against ``W0·x + Σ c·L·(R·x)`` in float32, where ``ΔW = L·R`` is the adapter's
   update in factored form (LoRA: ``B·A``; never formed). The tolerance follows from the
   output dtype's unit roundoff ``u``: ``|Ŵ − W_ref| <= u·|Ŵ|`` elementwise, and
   Hoeffding's inequality over the random signs of ``x`` bounds ``|(Ŵ − W_ref)·x|_i`` by
   ``λ·u·‖Ŵ_i‖`` except with probability 1e-15, plus float32 arithmetic terms. A wrong
   transpose or scale in any layer misses by far more. Tensors no adapter touches must be
   the base's, bit for bit (after the one rounding to the output dtype).
2. **Logits, small models.** Up to ``logits_max_params`` parameters: the merged model
   against the unmerged PeftModel (float32) on a fixed prompt set: max abs logit
   difference, KL divergence, top-1 agreement, perplexity ratio, greedy-decode agreement
   over ``greedy_tokens`` tokens; thresholds by dtype (``stages.metrics``), overridable.

A failure is one finding (F303 for a tensor, F304 for the logits) whose manifest entry
carries the numbers; on success they are the stage's metrics and ``report.json``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

from ..metrics import THRESHOLD_PARAMS, gate_params
from ..pipeline import Param

NAME = "check"
VERSION = 1
INPUT = ("hf-model",)
OUTPUT = "report"
LIBS = ("torch", "transformers", "peft", "safetensors")
CARD_METRICS = ("probe_worst_ratio", "logits_max_abs_diff", "logits_kl_mean", "logits_top1_agreement",
                "logits_ppl_ratio", "logits_greedy_agreement")  # the merged model's card shows them with bounds
PARAMS = {
    "probes": Param(int, 16, help="random ±1 probe vectors per merged tensor (0: no probe test); the mean-square "
                                  "test's bound tightens with more (docs/validation.md)"),
    "logits_max_params": Param(int, 1_000_000_000, help="compare logits only for models with at most this many "
                                                        "parameters (0: never); needs ~4 bytes RAM per parameter"),
    **gate_params(test="merged", ref="adapter model", greedy_tokens=16, greedy_prompts=4, prefix="",
                  seed_help="seed of the probes and of the token-id prompts",
                  defaults={k: "default: by dtype" for k in THRESHOLD_PARAMS}),
}
BLOCK_BYTES = 32 << 20  # float32 bytes of one row block
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "Question: What is 12 times 7?\nAnswer:",
    "The quick brown fox jumps over the",
    "In 1969, the first humans landed on",
    "Translate to French: Good morning, how are you?",
    "A list of three colours: red,",
]
_ID_PROMPTS = (6, 12)  # token-id prompts when there is no tokenizer: how many, how long


def check_params(ctx) -> None:
    """When the pipeline file loads (F103, with its line): counts not negative, agreements in
    [0, 1], prompts a list of strings or of token-id lists."""
    from ..findings import FuseError

    params, where = ctx.params, dict(file=ctx.pipeline.path, line=ctx.stage.line)
    for name in ("probes", "logits_max_params", "greedy_tokens", "greedy_prompts", "max_abs_diff", "max_kl",
                 "max_ppl_ratio", "min_top1", "min_greedy"):
        value = params.get(name)
        if value is not None and (value < 0 or (name.startswith("min_") and value > 1)):
            raise FuseError("F103", f"{name} must be {'in [0, 1]' if name.startswith('min_') else '>= 0'}, "
                            f"got {value}", key=f"{ctx.stage.id}.{name}", **where)
    prompts = params.get("prompts")
    if prompts is not None and not (
            prompts and (all(isinstance(p, str) and p for p in prompts)
                         or all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                                   and t >= 0 for t in p) for p in prompts))):
        raise FuseError("F103", "prompts must be a non-empty list of strings or of token-id lists",
                        key=f"{ctx.stage.id}.prompts", fix="e.g. prompts: [[1, 17, 42, 99], [1, 5, 6]]", **where)


def run(ctx) -> dict:
    upstream = ctx.pipeline.stage(ctx.input_stage)
    report = check_merge(ctx.base.dir, ctx.adapters, ctx.input_dir,
                         merge_options=dict(upstream.params) if upstream.name == "merge" else None,
                         probes=ctx.params["probes"], seed=ctx.params["seed"],
                         logits_max_params=ctx.params["logits_max_params"], prompts=ctx.params["prompts"],
                         greedy_tokens=ctx.params["greedy_tokens"], greedy_prompts=ctx.params["greedy_prompts"],
                         thresholds={k: ctx.params[k] for k in THRESHOLD_PARAMS}, log=ctx.log)
    report = _jsonable(report)
    from ..paths import portable

    saved = dict(report, metrics={k: v for k, v in report["metrics"].items() if k != "seconds"})  # no timings
    saved = portable(saved, ctx.pipeline.path.parent)  # no local paths: the same report in every checkout
    (ctx.output_dir / "report.json").write_text(json.dumps(saved, indent=2, sort_keys=True, default=str) + "\n")
    return report["metrics"]


def check_merge(base_dir, adapters, merged_dir, *, merge_options: dict | None = None, probes: int = 16,
                seed: int = 0, logits_max_params: int = 1_000_000_000, prompts=None, greedy_tokens: int = 16,
                greedy_prompts: int = 4, thresholds: dict | None = None, log=None) -> dict:
    """Check the model at ``merged_dir`` against ``base_dir`` + ``adapters`` (``[(path, weight)]``).

    ``merge_options`` are the merge's parameters (``method``, ``density``, ``seed``,
    ``base_precision``, ``nf4_double_quant``; ``{}`` for the defaults); None when the model
    did not come from a merge: then only its logits are compared. Raises F303 (a tensor)
    or F304 (the logits), with the numbers in the finding's ``metrics``; returns
    ``{"metrics": {...}, "tensors": [...], "logits": {...}}``.

    Example::

        report = check_merge("models/llama", [("outputs/lora", 1.0)], "runs/x/merge", merge_options={})
        report["metrics"]["probe_worst_ratio"]   # <= 1: every tensor within its rounding bound
    """
    from ..findings import FuseError
    from ..io.safetensors import ModelWeights

    log = log or (lambda message: None)
    started = time.perf_counter()
    options = {"method": "linear", "density": None, "seed": None, "base_precision": "original",
               "nf4_double_quant": False, **{k: v for k, v in (merge_options or {}).items() if v is not None}}
    plan = merge_plan(base_dir, adapters, options)
    merged = ModelWeights.open(merged_dir)
    check_structure(plan, merged)

    metrics: dict = {}
    rows = probe_merge(plan, merged, probes=probes, seed=seed, log=log) \
        if probes > 0 and merge_options is not None else []
    updated = [r for r in rows if r["kind"] != "unchanged"]
    if rows:
        worst = max(rows, key=lambda r: r["ratio"])
        metrics.update(probe_tensors=len(updated), probe_worst_ratio=_round(worst["ratio"]),
                       probe_worst_tensor=worst["name"], unchanged_identical=len(rows) - len(updated))
        if updated:
            metrics.update(delta_retained_min=_round(min(r["retained"] for r in updated)),
                           delta_retained_max=_round(max(r["retained"] for r in updated)),
                           delta_cos_min=_round(min(r["cos"] for r in updated)))
    failed = [r for r in rows if not r["ok"]]
    if failed:
        first = max(failed, key=lambda r: r["ratio"])
        more = f" ({len(failed) - 1} more tensors fail)" if len(failed) > 1 else ""
        raise FuseError("F303", f"merged tensor {first['name']} differs from base + adapter: {first['why']}{more}",
                        file=str(merged[first["name"]].path), key=first["name"],
                        fix="the merge wrote something other than W0 + ΔW (or its files were altered): run merge "
                            "again; if it persists, report it with this run's manifest",
                        metrics=_jsonable(dict(metrics, seconds=_round(time.perf_counter() - started))),
                        failed_tensors=_jsonable(failed[:20]))

    logits = compare_logits(plan, merged, adapters, options, max_params=logits_max_params, prompts=prompts,
                            seed=seed, greedy_tokens=greedy_tokens, greedy_prompts=greedy_prompts,
                            thresholds=thresholds, log=log)
    metrics.update({f"logits_{k}": v for k, v in logits.get("metrics", {}).items()
                    if k in ("max_abs_diff", "kl_mean", "top1_agreement", "greedy_agreement", "ppl_ratio")})
    if "skipped" in logits:
        metrics["logits_skipped"] = logits["skipped"]
    if logits.get("failures"):
        raise FuseError("F304", "the merged model's logits differ from the adapter model's: "
                        + "; ".join(logits["failures"]), file=str(merged_dir),
                        fix="if the probe test passed, the difference is rounding: merge to a wider dtype "
                            "(merge.dtype: float32) or relax the threshold (--set check.<threshold>=...)",
                        metrics=_jsonable(dict(metrics, seconds=_round(time.perf_counter() - started))),
                        logits=_jsonable(logits))
    metrics["seconds"] = _round(time.perf_counter() - started)
    return {"metrics": metrics, "tensors": rows, "logits": logits}


def merge_plan(base_dir, adapters, options: dict):
    """The plan the merge followed: the same base view (bitsandbytes checkpoints dequantized), the
    same planner, method and NF4 policy as :func:`stages.peft.merge.merge_model`."""
    from ..peft.adapter import load_adapter
    from ..peft.combine import check_method
    from ..peft.plan import plan_merge
    from ..peft.quantized import nf4_targets, open_base

    density = check_method(options["method"], options["density"], options["seed"], len(adapters))
    base = open_base(base_dir)
    plan = plan_merge(base, [load_adapter(Path(p), w) for p, w in adapters], method=options["method"])
    plan.options = {"density": density, "seed": options["seed"], "double_quant": options["nf4_double_quant"],
                    "nf4": nf4_targets(base) if options["base_precision"] == "nf4" else set()}
    return plan


# --------------------------------------------------------------------------- structure


def check_structure(plan, merged) -> None:
    """The merged model holds exactly the planned tensors, with their shapes, and a config that
    does not re-tie an lm_head the merge untied (F303)."""
    from ..findings import FuseError
    from ..io.safetensors import FLOAT_DTYPES

    where = {"file": str(merged.dir), "fix": "run merge again; the output is not what the merge plans"}
    missing = [n for n in plan.outputs if n not in merged]
    if missing:
        raise FuseError("F303", f"the merged model lacks tensor {missing[0]}"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""), key=missing[0], **where)
    extra = [n for n in merged.tensors if n not in plan.outputs]
    if extra:
        raise FuseError("F303", f"the merged model has tensor {extra[0]}, which neither the base nor the adapter "
                        "has", key=extra[0], **where)
    for name, src in plan.outputs.items():
        got = merged[name]
        if tuple(got.shape) != tuple(plan.shape(name)):  # the base's, or as an adapter resized it
            raise FuseError("F303", f"merged tensor {name} has shape {list(got.shape)}, the plan "
                            f"{list(plan.shape(name))}", key=name, **where)
        if (src.dtype in FLOAT_DTYPES) != (got.dtype in FLOAT_DTYPES) or \
                (src.dtype not in FLOAT_DTYPES and got.dtype != src.dtype):
            raise FuseError("F303", f"merged tensor {name} is {got.dtype}, the base {src.dtype}", key=name, **where)
    if plan.untie:
        config = merged.config
        sections = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
        if any(s.get("tie_word_embeddings") is True for s in sections) or "tie_word_embeddings" not in config:
            raise FuseError("F303", "the adapter changes lm_head (or the embedding tied to it), but the merged "
                            "config.json does not set tie_word_embeddings: false, so loading it would tie "
                            "lm_head back to the embedding", file=str(merged.dir / "config.json"),
                            key="tie_word_embeddings", fix="run merge again")


# --------------------------------------------------------------------------- the probe test

FACTORED = ("linear", "embedding", "bias")  # ΔW = L @ R in closed form: probed without forming ΔW
FORMULA = FACTORED + ("dora_linear", "dora_embedding", "tokens")  # a reference written here from peft's formulas
_FORMAT = {"F32": (24, -149), "F64": (24, -149), "BF16": (8, -133), "F16": (11, -24)}  # significand bits,
# exponent of the smallest subnormal (F64 outputs hold float32 results, so they round like F32)


def _matrix_shape(shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1


def read_rows(info, r0: int, r1: int):
    """Rows ``[r0, r1)`` of a stored tensor as a 2-D torch tensor (its own dtype), by ``pread``."""
    import torch

    from ..findings import FuseError
    from ..io.safetensors import ITEMSIZE, torch_dtype

    rows, cols = _matrix_shape(info.shape)
    item = ITEMSIZE[info.dtype]
    nbytes = (r1 - r0) * cols * item
    if nbytes == 0:
        return torch.empty((r1 - r0, cols), dtype=torch_dtype(info.dtype))
    buf = bytearray(nbytes)
    view = memoryview(buf)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], info.start + r0 * cols * item + done)
            if n == 0:
                raise FuseError("F206", f"{info.path.name} ended while reading tensor {info.name!r}",
                                file=info.path, key=info.name, fix="re-download or re-save the file")
            done += n
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(r1 - r0, cols)


def half_ulp(W, dtype: str):
    """Half the spacing of ``dtype``'s numbers at each value of ``W`` (float32 holding ``dtype`` values):
    the largest error of rounding a real number to nearest and getting ``W``."""
    import torch

    p, sub = _FORMAT[dtype]
    _, e = torch.frexp(W)  # W = m·2^e, 0.5 <= |m| < 1: the spacing there is 2^(e-p)
    e = torch.where(W == 0, torch.full_like(e, sub), e - p).clamp_min(sub)
    return torch.ldexp(torch.full_like(W, 0.5), e)


def _gamma(n: int, lam: float, u: float) -> float:
    """Higham & Mary's probabilistic bound on the relative error of an n-term float sum."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


class _Stats:
    """Both tests of one tensor, over its row blocks and probes: the per-row bound
    ``|err| <= λ·σ_i + τ_i`` and the mean square ``mean((|err| - τ_i)₊² / σ_i²) <= s_k``."""

    def __init__(self, lam: float, bound: float):
        self.lam, self.bound = lam, bound
        self.worst = (0.0, 0, 0.0, 0.0)  # ratio, row, error, tolerance
        self.sumsq = 0.0
        self.count = 0
        self.dot = self.norm_m = self.norm_ref = 0.0

    def add(self, r0: int, err, sigma, tau, d_merged, d_ref) -> None:
        import torch

        sigma, tau = sigma.reshape(-1, 1), tau.reshape(-1, 1)
        tol = self.lam * sigma + tau
        ratio = torch.where(tol > 0, err / tol.clamp_min(1e-38), torch.where(err > 0, math.inf, 0.0))
        r, k = divmod(int(ratio.argmax()), ratio.shape[1])
        if float(ratio[r, k]) > self.worst[0] or self.count == 0:
            self.worst = (float(ratio[r, k]), r0 + r, float(err[r, k]), float(tol[r, 0]))
        excess = (err - tau).clamp_min(0)
        z = torch.where(sigma > 0, excess / sigma.clamp_min(1e-38), torch.where(excess > 0, math.inf, 0.0))
        self.sumsq += float(z.double().square().sum())
        self.count += z.numel()
        self.dot += float((d_merged.double() * d_ref.double()).sum())
        self.norm_m += float(d_merged.double().square().sum())
        self.norm_ref += float(d_ref.double().square().sum())

    def row(self, name: str, info, kinds, reference: str) -> dict:
        ratio, r, err, tol = self.worst
        ms_ratio = (self.sumsq / self.count) / self.bound if self.count else 0.0
        nm, nr = self.norm_m, self.norm_ref
        retained = math.sqrt(nm / nr) if nr > 0 else (1.0 if nm == 0 else math.inf)
        cos = self.dot / math.sqrt(nm * nr) if nm > 0 and nr > 0 else (1.0 if nm == nr else 0.0)
        out = {"name": name, "kind": "+".join(kinds), "dtype": info.dtype, "reference": reference,
               "ratio": max(ratio, ms_ratio), "row_ratio": ratio, "ms_ratio": ms_ratio,
               "retained": retained, "cos": cos}
        out["ok"] = out["ratio"] <= 1.0
        if not out["ok"]:
            out["why"] = (f"probe error {err:.3g} at row {r} is {ratio:.3g}x its {info.dtype} rounding bound "
                          f"{tol:.3g}, the mean square error {ms_ratio:.3g}x its bound; the change from the base "
                          f"is {retained:.3g}x the adapter's update (cos {cos:.3f})")
        return out


def _rademacher(cols: int, probes: int, seed: int, name: str):
    import torch

    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randint(0, 2, (cols, probes), generator=gen, dtype=torch.float32).mul_(2).sub_(1)


def _factors(update, tensors: dict, rows: int, cols: int):
    """``(L, R)`` with ``ΔW = L @ R`` in the stored layout ``[rows, cols]``, from peft's formulas
    (``Linear.get_delta_weight``: ``B @ A``, transposed for fan_in_fan_out; ``Embedding``:
    ``(B @ A).T``; ``lora_bias``: the bias)."""
    import torch

    kind = update.kind.removeprefix("dora_")
    if kind == "linear":
        A, B = tensors["A"], tensors["B"]
        return (A.T, B.T) if update.fan_in_fan_out else (B, A)
    if kind == "embedding":
        return tensors["emb_A"].T, tensors["emb_B"].T
    return tensors["bias"].reshape(rows, 1), torch.ones(1, cols)


def _base_tensor(plan, name: str):
    """The whole tensor the merge starts ``name`` from, as it does: the base's (dequantized when the
    base is a bitsandbytes checkpoint), through the NF4 round trip when the merge used one."""
    info = plan.outputs[name]
    W = plan.base.load(info.name)
    if info.name in plan.options.get("nf4", ()):
        from ..peft.quantized import nf4_round_trip

        W = nf4_round_trip(W, plan.options.get("double_quant", False))
    return W


def probe_merge(plan, merged, *, probes: int = 16, seed: int = 0, log=None) -> list[dict]:
    """Probe every merged tensor (see the module docstring); one row per tensor:
    ``{name, kind, dtype, reference, ratio, row_ratio, ms_ratio, ok, retained, cos, why}``,
    ``ratio`` <= 1 passing (the larger of the two tests, each over its bound)."""
    import torch

    from ..io.safetensors import ModelWeights
    from ..metrics import mean_square_bound, probe_lambda

    lam, bound = probe_lambda(), mean_square_bound(probes)
    plain = type(plan.base) is ModelWeights  # stored as it is used: rows can be read in blocks
    nf4 = plan.options.get("nf4", ())
    out = []
    total = len(merged.tensors)
    with torch.no_grad():
        for i, (name, info) in enumerate(merged.tensors.items(), 1):
            streamable = plain and plan.outputs[name].name not in nf4
            updates = plan.updates.get(name, [])
            if not updates:
                out.append(_compare_unchanged(plan, name, info, streamable))
            else:
                out.append(_probe_updated(plan, name, info, updates, probes, seed, lam, bound, streamable))
            if log and total > 200 and (i % 200 == 0 or i == total):
                log(f"  check: {i}/{total} tensors probed")
    return out


def _compare_unchanged(plan, name: str, info, streamable: bool) -> dict:
    """A tensor no adapter touches must be the base's, rounded once to the output dtype, bit for bit."""
    import torch

    rows, cols = _matrix_shape(info.shape)
    block = max(1, BLOCK_BYTES // max(1, cols * 4)) if streamable else rows
    whole = None if streamable else _base_tensor(plan, name).reshape(rows, cols)
    row = {"name": name, "kind": "unchanged", "dtype": info.dtype, "ratio": 0.0, "ok": True}
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        got = read_rows(info, r0, r1)
        want = read_rows(plan.outputs[name], r0, r1) if streamable else whole[r0:r1]
        want = want.to(got.dtype)
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        if not torch.equal(got.view(ints), want.view(ints)):
            diff = (got.double() - want.double()).abs().nan_to_num(math.inf)
            where = int(diff.flatten().argmax())
            row.update(ratio=math.inf, ok=False,
                       why=f"no adapter update targets it, yet it differs from the base (by up to "
                           f"{float(diff.max()):.3g}, row {r0 + where // cols})")
            return row
    return row


def _probe_updated(plan, name, info, updates, probes, seed, lam, bound, streamable) -> dict:
    from ..metrics import unit_roundoff

    rows, cols = _matrix_shape(info.shape)
    X = _rademacher(cols, probes, seed, name)
    repl = [u for u in updates if u.kind == "replace"]
    start = plan.adapters[repl[0].adapter].load(repl[0].tensors["tensor"]).float().reshape(rows, cols) \
        if repl else None
    deltas = []
    for u in updates:
        if u.kind != "replace":
            adapter = plan.adapters[u.adapter]
            deltas.append((u, {role: adapter.load(key).float() for role, key in u.tensors.items()}))
    kinds = sorted({u.kind for u in updates})
    delta_kinds = {u.kind for u, _ in deltas}
    stats = _Stats(lam, bound)
    u_out, u32 = unit_roundoff(info.dtype if info.dtype != "F64" else "F32"), unit_roundoff("F32")
    if plan.method == "linear" and delta_kinds <= set(FACTORED):
        if start is None and not streamable:
            start = _base_tensor(plan, name).float().reshape(rows, cols)
        _probe_factored(plan, name, info, start, deltas, X, stats, u_out, u32)
        return stats.row(name, info, kinds, "factored")
    if start is None:
        start = _base_tensor(plan, name).float().reshape(rows, cols)
    rank = sum(_factors(u, t, rows, cols)[1].shape[0] for u, t in deltas if u.kind.removeprefix("dora_") in FACTORED)
    n_terms = rows + cols + rank + 4  # the longest float32 sums in either computation of the reference
    if plan.method == "linear" and delta_kinds <= set(FORMULA):
        ref, absref = _formula_reference(start, deltas, rows, cols)
        reference = "formula"
    else:  # other families and TIES/DARE: replay the merge engine's own math on this tensor
        from ..peft.merge import _merge_tensor

        base = start if not repl else _base_tensor(plan, name).float()
        ref = _merge_tensor(plan, name, base.reshape(plan.outputs[name].shape).clone()).reshape(rows, cols)
        absref = start.abs() + (ref - start).abs()
        reference = "engine"
    W = read_rows(info, 0, rows).float()
    g = _gamma(n_terms, lam, u32)
    err = (W @ X - ref @ X).abs()
    eps = half_ulp(W, info.dtype if info.dtype != "F64" else "F32") + (u32 * (1 + u_out)) * W.abs()
    sigma = _norm(eps) + 2 * g * _norm(absref)
    tau = _gamma(cols + 2, lam, u32) * (W.abs().sum(1) + absref.sum(1))
    stats.add(0, err, sigma, tau, (W - start) @ X, (ref - start) @ X)
    return stats.row(name, info, kinds, reference)


def _norm(t):
    import torch

    return torch.linalg.vector_norm(t, dim=1)


def _probe_factored(plan, name, info, start, deltas, X, stats, u_out, u32) -> None:
    """``Ŵ·X`` against ``W0·X + Σ c·L·(R·X)``, row block by row block; ΔW is never formed."""
    import torch

    rows, cols = _matrix_shape(info.shape)
    lam = stats.lam
    pre, rank = [], 0
    for u, tensors in deltas:
        L, R = _factors(u, tensors, rows, cols)
        c = u.scaling * u.weight
        pre.append((c, L, R @ X, R.abs().sum(1), _norm(R)))
        rank += R.shape[0]
    g_merge, g_dot = _gamma(rank + 2, lam, u32), _gamma(cols + rank + 2, lam, u32)
    block = max(1, BLOCK_BYTES // max(1, cols * 4))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        W = read_rows(info, r0, r1).float()
        W0 = start[r0:r1] if start is not None else read_rows(plan.outputs[name], r0, r1).float()
        y0 = W0 @ X
        y_delta = torch.zeros_like(y0)
        l1, l2 = W0.abs().sum(1), _norm(W0)
        for c, L, RX, R1, R2 in pre:
            Lb = L[r0:r1]
            y_delta += c * (Lb @ RX)
            l1 = l1 + abs(c) * (Lb.abs() @ R1)
            l2 = l2 + abs(c) * (Lb.abs() @ R2)
        y = W @ X
        # σ: Hoeffding over the signs of X, for the merge's elementwise error: one rounding to the output
        # dtype (half an ulp of each written value), the float32 add, and its float32 B@A sums;
        # τ: the float32 sums of the probe products themselves (ours)
        eps = half_ulp(W, info.dtype if info.dtype != "F64" else "F32") + (u32 * (1 + u_out)) * W.abs()
        sigma = _norm(eps) + g_merge * l2
        tau = g_dot * (W.abs().sum(1) + l1)
        stats.add(r0, (y - (y0 + y_delta)).abs(), sigma, tau, y - y0, y_delta)


def _formula_reference(start, deltas, rows: int, cols: int):
    """The merged tensor in float32, in full, from peft's formulas: ``W + c·L@R`` (LoRA), DoRA
    (``DoraLinearVariant.merge_unsafe``: ``m / ‖W0 + ΔW‖ · (W + ΔW)``, the norm over each output
    row; over columns for fan_in_fan_out and embeddings), trained tokens (rows replaced).
    Returns it and the elementwise magnitude of what was summed (for the tolerance)."""
    import torch

    ref, absref = start.clone(), start.abs()
    for u, tensors in deltas:
        if u.kind == "tokens":
            index = torch.tensor(u.extra["rows"], dtype=torch.long)
            ref.index_copy_(0, index, tensors["tokens"].reshape(len(index), cols))
            absref.index_copy_(0, index, tensors["tokens"].reshape(len(index), cols).abs())
            continue
        L, R = _factors(u, tensors, rows, cols)
        c = u.scaling * u.weight
        delta, absdelta = c * (L @ R), abs(c) * (L.abs() @ R.abs())
        if u.kind.startswith("dora_"):
            dim = 1 if (u.kind == "dora_linear" and not u.fan_in_fan_out) else 0
            norm = torch.linalg.vector_norm(start + delta, dim=dim, keepdim=True)
            factor = tensors["m"].reshape(norm.shape) / norm
            ref, absref = factor * (ref + delta), factor.abs() * (absref + absdelta)
        else:
            ref, absref = ref + delta, absref + absdelta
    return ref, absref


# --------------------------------------------------------------------------- the logits test


def compare_logits(plan, merged, adapters, options: dict, *, max_params: int, prompts, seed: int,
                   greedy_tokens: int, greedy_prompts: int, thresholds: dict | None, log) -> dict:
    """Logits of the merged model against the unmerged PeftModel (float32), or why not."""
    from .. import metrics as M
    from ..io.safetensors import ModelWeights

    n_params = sum(math.prod(t.shape) for t in merged.tensors.values())
    why = None
    if max_params <= 0 or n_params > max_params:
        why = f"{n_params:,} parameters > logits_max_params {max_params:,}"
    elif options["method"] != "linear":
        why = f"method {options['method']} combines the adapters' updates; no PeftModel computes that"
    elif options["base_precision"] != "original" or type(plan.base) is not ModelWeights:
        why = "the merge started from a dequantized or NF4 round-tripped base; the probe test covers it"
    if why:
        log(f"  check: logits not compared: {why}")
        return {"skipped": why}
    dtype = _main_dtype(merged)
    limits = M.thresholds_for(dtype, thresholds)
    try:
        ref_model = _peft_model(plan.base.dir, adapters)
    except _Unsupported as e:
        log(f"  check: logits not compared: {e}")
        return {"skipped": str(e)}
    token_prompts, source = _prompts(merged, prompts, seed)
    log(f"  check: logits of the adapter model and the merged model on {len(token_prompts)} prompts ({source})")
    ref = M.run_prompts(ref_model, token_prompts, greedy_tokens, greedy_prompts)
    del ref_model
    test_model = _causal_lm(merged.dir)
    test = M.run_prompts(test_model, token_prompts, greedy_tokens, greedy_prompts)
    del test_model
    values = M.compare(ref, test, token_prompts)
    failures = M.gate(values, limits)
    log(f"  check: logits {'outside the gate' if failures else 'passed'}: "
        + M.describe(values, limits, ("max_abs_diff", "kl_mean", "top1_agreement", "greedy_agreement", "ppl_ratio")))
    return {"metrics": values, "thresholds": limits, "dtype": dtype, "prompts": source, "failures": failures}


class _Unsupported(Exception):
    pass


def _causal_lm(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (ValueError, KeyError, OSError) as e:  # not a causal LM, custom code, ...
        raise _Unsupported(f"transformers cannot load {model_dir} as a causal LM "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def _peft_model(base_dir, adapters):
    """The unmerged reference: base in float32 with every adapter active, each scaled by its weight."""
    from peft import PeftModel

    from ..peft.adapter import peft_refusal

    model = _causal_lm(base_dir)
    with _without_gptqmodel_dispatch():
        with peft_refusal(adapters[0][0]):  # an adapter peft's own loader refuses is F201, not a crash
            peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name="a0")
        for i, (path, _) in enumerate(adapters[1:], 1):
            with peft_refusal(path):
                peft_model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)
    weights = {f"a{i}": float(w) for i, (_, w) in enumerate(adapters)}
    if any(w != 1.0 for w in weights.values()):
        for module in peft_model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict):
                for name in list(scaling):
                    if name in weights:
                        scaling[name] *= weights[name]
    return peft_model.eval()


@contextlib.contextmanager
def _without_gptqmodel_dispatch():
    """peft asks gptqmodel, for every layer it wraps, whether the layer is a GPTQ/AWQ one; with
    gptqmodel installed that imports it (6-10 s and a banner on stdout). The base here is a plain
    float32 model loaded by transformers, so no layer can be one: answer "not available" instead."""
    import importlib

    patched = []
    for name in ("peft.tuners.lora.gptq", "peft.tuners.lora.awq", "peft.utils.other"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - another peft layout
            continue
        if hasattr(module, "is_gptqmodel_available") and "gptqmodel" not in sys.modules:
            patched.append((module, module.is_gptqmodel_available))
            module.is_gptqmodel_available = lambda: False
    try:
        yield
    finally:
        for module, original in patched:
            module.is_gptqmodel_available = original


def _prompts(merged, prompts, seed: int) -> tuple[list[list[int]], str]:
    """Token ids to feed: the ``prompts`` param (strings need the tokenizer), else the built-in
    text prompts through the merged model's tokenizer, else seeded token ids."""
    import random

    from ..findings import FuseError

    vocab = merged.config.get("vocab_size") or (merged.config.get("text_config") or {}).get("vocab_size")
    if prompts:  # their form was checked when the pipeline loaded (check_params)
        if all(isinstance(p, list) for p in prompts):
            bad = [t for p in prompts for t in p if vocab and t >= vocab]
            if bad:
                raise FuseError("F103", f"check.prompts holds token id {bad[0]}, outside the vocabulary of {vocab}",
                                key="check.prompts", fix=f"use token ids below {vocab}")
            return [list(p) for p in prompts], "token ids from check.prompts"
        tok = _tokenizer(merged.dir)
        if tok is None:
            raise FuseError("F103", "check.prompts are strings, but the merged model has no tokenizer",
                            key="check.prompts", fix="give token ids instead, e.g. [[1, 17, 42, 99]]")
        return [tok(p)["input_ids"] for p in prompts], "text from check.prompts"
    tok = _tokenizer(merged.dir)
    if tok is not None:
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        if all(len(i) >= 2 for i in ids):
            return ids, "built-in text prompts"
    rng = random.Random(seed)
    count, length = _ID_PROMPTS
    bos = merged.config.get("bos_token_id")
    out = []
    for _ in range(count):
        ids = [rng.randrange(int(vocab or 2)) for _ in range(length)]
        if isinstance(bos, int):
            ids[0] = bos
        out.append(ids)
    return out, f"{count} seeded token-id prompts (no tokenizer)"


def _tokenizer(model_dir):
    if not any((Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                         "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer: fall back to token ids
        return None


def _main_dtype(merged) -> str:
    """The float dtype holding most of the merged model's bytes."""
    sizes: dict = {}
    for t in merged.tensors.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
    floats = {d: n for d, n in sizes.items() if d in ("F32", "F16", "BF16", "F64")}
    return max(floats, key=floats.get) if floats else "F32"


def _round(x):
    return float(f"{x:.4g}") if isinstance(x, float) and math.isfinite(x) else _jsonable(x)


def _jsonable(obj):
    """``obj`` with non-finite floats as strings ("inf"), so the manifest stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
