"""Calibration data for GPTQ / AWQ: token-id samples from a file, a Hub dataset or the built-in text.

Sources (``dataset``):

- ``None``: the built-in text (:data:`stages.quantization.texts.CALIBRATION_TEXT`), offline;
- a local ``.txt`` file: its text;
- a local ``.jsonl`` / ``.json`` file: records that are strings, ``{"text": ...}`` (``field``
  names another key), lists of token ids, or ``{"input_ids": [...]}``;
- a Hub dataset id (``org/name`` or ``name``, with ``config``, ``split``, ``revision``):
  its ``field`` column, read with ``datasets`` (streaming; stops once it has enough text).

Text is joined (paragraphs apart), tokenized once and cut into consecutive windows of
``seq_len`` tokens (a BOS first where the tokenizer has one); the first ``samples`` windows
are used. Token-id records are samples as they are (cut to ``seq_len``): that is how a model
without a tokenizer is calibrated. Everything is deterministic: same inputs, same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..findings import FuseError

DEFAULTS = {"dataset": None, "config": None, "split": "train", "revision": None, "field": "text",
            "samples": 128, "seq_len": 512}
KEYS = tuple(DEFAULTS)
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json")
CHARS_PER_TOKEN = 8  # generous: how much text to read from a stream for the tokens asked for


@dataclass
class Calibration:
    samples: list[list[int]]  # token ids, one list per sample
    source: str  # in words, for the log and the manifest

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def resolve(spec: dict | None, *, key: str = "quantize.calibration") -> dict:
    """``spec`` with defaults filled in, or F103 naming the bad key."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise FuseError("F102", f"unknown key '{unknown[0]}' in {key}", key=f"{key}.{unknown[0]}",
                        fix="valid keys: " + ", ".join(KEYS))
    out = dict(DEFAULTS, **{k: v for k, v in spec.items() if v is not None})
    for name in ("samples", "seq_len"):
        if not isinstance(out[name], int) or isinstance(out[name], bool) or out[name] < 1:
            raise FuseError("F103", f"{key}.{name} must be a positive integer, got {out[name]!r}",
                            key=f"{key}.{name}")
    for name in ("dataset", "config", "split", "revision", "field"):
        if out[name] is not None and not isinstance(out[name], str):
            raise FuseError("F103", f"{key}.{name} must be a string, got {out[name]!r}", key=f"{key}.{name}")
    return out


def local_path(dataset: str | None, here: Path | None = None) -> Path | None:
    """The local file ``dataset`` names (relative to ``here``), or None when it is no local path."""
    if not dataset:
        return None
    p = Path(dataset).expanduser()
    if not p.is_absolute() and here is not None:
        p = here / p
    if p.exists() or p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES or dataset.startswith((".", "/", "~")):
        return p
    return None


def load_calibration(spec: dict, tokenizer, *, vocab_size: int | None, key: str = "quantize.calibration",
                     here: Path | None = None) -> Calibration:
    """Token-id samples for ``spec`` (resolved by :func:`resolve`). ``tokenizer`` may be None
    (then the source must hold token ids). Raises F603 for data that cannot be used."""
    spec = resolve(spec, key=key)
    n, seq_len = spec["samples"], spec["seq_len"]
    dataset = spec["dataset"]
    path = local_path(dataset, here)
    if dataset is None:
        from .texts import CALIBRATION_TEXT

        texts, ids, source = [CALIBRATION_TEXT], None, "built-in calibration text"
    elif path is not None:
        if not path.is_file():
            raise FuseError("F603", f"calibration file {path} does not exist", file=str(path), key=f"{key}.dataset",
                            fix="give a .txt or .jsonl file (relative to the pipeline file) or a Hub dataset id")
        texts, ids = _read_file(path, spec["field"], key)
        source = f"{path.name}"
    else:
        texts, ids = _read_hub(dataset, spec, n * seq_len * CHARS_PER_TOKEN, key), None
        source = f"hub dataset {dataset}" + (f" ({spec['config']})" if spec["config"] else "") + f" [{spec['split']}]"
    if ids is not None:
        samples = [list(s[:seq_len]) for s in ids if len(s) >= 2][:n]
        kind = "token ids"
    else:
        if tokenizer is None:
            raise FuseError("F603", f"calibration from {source} is text, but the model has no tokenizer",
                            key=f"{key}.dataset",
                            fix='give token ids instead: a .jsonl file with lines like {"input_ids": [1, 17, 42, ...]}')
        samples = _windows(texts, tokenizer, n, seq_len)
        kind = "tokens"
    if not samples:
        raise FuseError("F603", f"calibration data from {source} holds no sample of 2 or more tokens",
                        key=f"{key}.dataset", fix="give more text, or token-id lists of 2 or more ids")
    if vocab_size:
        bad = next((t for s in samples for t in s if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise FuseError("F603", f"calibration token id {bad} is outside the model's vocabulary of {vocab_size}",
                            key=f"{key}.dataset", fix="token ids must come from this model's tokenizer")
    lengths = sorted(len(s) for s in samples)
    return Calibration(samples, f"{source}: {len(samples)} samples of {lengths[0]}"
                                + (f"-{lengths[-1]}" if lengths[-1] != lengths[0] else "") + f" {kind}")


def _windows(texts: list[str], tokenizer, n: int, seq_len: int) -> list[list[int]]:
    text = "\n\n".join(t.strip() for t in texts if t and t.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    step = seq_len - 1 if isinstance(bos, int) else seq_len
    out = []
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        if len(chunk) < min(step, 32) and out:  # a short tail adds little; keep it only if it is all there is
            break
        out.append(([bos] if isinstance(bos, int) else []) + chunk)
        if len(out) == n:
            break
    return out


def _read_file(path: Path, field: str, key: str) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token-id lists) from a .txt / .jsonl / .json file."""
    where = dict(file=str(path), key=f"{key}.dataset")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FuseError("F603", f"cannot read calibration file {path}: {getattr(e, 'strerror', None) or e}",
                        fix="give a UTF-8 .txt or .jsonl file", **where) from None
    if path.suffix not in RECORD_SUFFIXES:
        return [raw], None
    if path.suffix == ".json":
        try:
            records = json.loads(raw)
        except ValueError as e:
            raise FuseError("F603", f"{path.name} is not valid JSON: {e}", fix="give a JSON list of records",
                            **where) from None
        if not isinstance(records, list):
            raise FuseError("F603", f"{path.name} must hold a list of records", fix="e.g. [\"text one\", ...]",
                            **where)
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except ValueError as e:
                raise FuseError("F603", f"{path.name} line {i} is not valid JSON: {e}", line=i,
                                fix='one JSON record per line, e.g. {"text": "..."} or {"input_ids": [1, 2, 3]}',
                                **where) from None
    texts, ids = [], []
    for i, rec in numbered:
        value = rec.get(field, rec.get("input_ids")) if isinstance(rec, dict) else rec
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            ids.append(value)
        else:
            raise FuseError("F603", f"{path.name} record {i} is neither text nor a list of token ids "
                                    f"(looked for a string, a list of ints, or the keys '{field}' / 'input_ids')",
                            line=i if path.suffix == ".jsonl" else None,
                            fix='e.g. {"text": "..."} or {"input_ids": [1, 17, 42]}', **where)
    if texts and ids:
        raise FuseError("F603", f"{path.name} mixes text records and token-id records",
                        fix="use one kind in a file", **where)
    return (texts, None) if texts else (None, ids)


def _read_hub(dataset: str, spec: dict, chars: int, key: str) -> list[str]:
    """Texts from a Hub dataset's ``field`` column, streamed until ``chars`` characters."""
    try:
        import datasets
    except ImportError:
        raise FuseError("F603", f"reading the Hub dataset {dataset} needs the datasets package",
                        key=f"{key}.dataset", fix="pip install datasets, or give a local .txt/.jsonl file") from None
    try:
        ds = datasets.load_dataset(dataset, spec["config"], split=spec["split"], revision=spec["revision"],
                                   streaming=True)
        texts, total = [], 0
        for rec in ds:
            value = rec.get(spec["field"]) if isinstance(rec, dict) else None
            if not isinstance(value, str):
                raise FuseError("F603", f"Hub dataset {dataset} has no text column '{spec['field']}'",
                                key=f"{key}.field", fix=f"name its text column: field: <column>; it has "
                                                        f"{', '.join(sorted(rec)) if isinstance(rec, dict) else '?'}")
            if value.strip():
                texts.append(value)
                total += len(value)
            if total >= chars:
                break
    except FuseError:
        raise
    except Exception as e:  # noqa: BLE001 - network, unknown dataset, offline mode: one finding
        raise FuseError("F603", f"cannot read the Hub dataset {dataset}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}",
                        key=f"{key}.dataset", fix="check the id, config and split, the network (HF_HUB_OFFLINE), "
                                                  "or give a local .txt/.jsonl file") from None
    return texts
