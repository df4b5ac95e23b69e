"""Run an exported causal-LM graph in ONNX Runtime: teacher-forced logits and greedy decoding with its KV cache.

The graph's interface is the one :mod:`stages.onnx.exporter` writes (Optimum's layout):
``input_ids``, ``attention_mask``, ``position_ids`` and, with past, ``past_key_values.{i}.key``
/ ``.value`` in, ``logits`` and ``present.{i}.key`` / ``.value`` out. The shapes of the past
inputs (kv heads, head dim) and their dtype are read from the graph.
"""
from __future__ import annotations

from pathlib import Path

_NP_DTYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxCausalLM:
    """An ONNX Runtime session over ``model.onnx`` (CPU), batch 1.

    Example::

        lm = OnnxCausalLM(Path("runs/x/export/model.onnx"))
        logits = lm.forward(torch.tensor([[1, 17, 42]]))          # [1, 3, vocab], float32
        tokens, step_logits = lm.greedy(torch.tensor([[1, 17, 42]]), 8)
    """

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.outputs if n.startswith("present.")]
        self.with_past = bool(self.past_names)
        if self.with_past:
            first = self.inputs[self.past_names[0]]
            self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
            self.past_dtype = _NP_DTYPE.get(first.type, "float32")

    def _feed(self, ids, past_len: int, past=None) -> dict:
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        feed = {"input_ids": ids,
                "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
                "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None, :].repeat(batch, 0)}
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        if self.with_past:
            if past is None:
                empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
                past = [empty] * len(self.past_names)
            feed.update(zip(self.past_names, past))
        return feed

    def run(self, ids, past_len: int = 0, past=None):
        """(logits as float32 numpy, presents) for ``ids`` [batch, seq] after a cache of ``past_len``."""
        import numpy as np

        out = self.session.run(None, self._feed(ids, past_len, past))
        by_name = dict(zip(self.outputs, out))
        return by_name["logits"].astype(np.float32), [by_name[n] for n in self.present_names]

    def forward(self, ids):
        """``torch [1, T] -> torch [1, T, V]`` float32: the whole sequence at once (prefill)."""
        import torch

        logits, _ = self.run(ids.numpy())
        return torch.from_numpy(logits)

    __call__ = forward

    def greedy(self, ids, n: int):
        """``n`` greedy tokens after ``ids`` [1, T]; with past, the prompt is prefilled once and each
        new token is decoded with the cache (the way the graph runs in production). Returns the
        tokens and the logits of each step ([n, V] float32 torch)."""
        import numpy as np
        import torch

        seq = ids.numpy().astype(np.int64)
        tokens, steps = [], []
        if not self.with_past:
            for _ in range(n):
                logits, _ = self.run(seq)
                nxt = int(logits[0, -1].argmax())
                tokens.append(nxt)
                steps.append(logits[0, -1])
                seq = np.concatenate([seq, [[nxt]]], axis=1)
            return tokens, torch.from_numpy(np.stack(steps)) if steps else torch.empty(0)
        logits, past = self.run(seq)
        past_len = seq.shape[1]
        for i in range(n):
            step = logits[0, -1]
            nxt = int(step.argmax())
            tokens.append(nxt)
            steps.append(step)
            if i == n - 1:
                break
            logits, past = self.run(np.array([[nxt]], dtype=np.int64), past_len, past)
            past_len += 1
        return tokens, torch.from_numpy(np.stack(steps)) if steps else torch.empty(0)


def op_types(path: Path) -> dict[str, int]:
    """How many nodes of each op type the graph has (``{"MatMulNBits": 14, ...}``)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in m.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
