"""A Hugging Face causal LM to ONNX with ``torch.onnx.export(dynamo=True)``, with or without KV cache.

Why torch's exporter and not optimum-onnx: optimum-onnx pins ``transformers<4.58`` and fails
on transformers 5 (``docs/quantize-export.md``). The dynamo exporter traces the model as it
runs in the installed transformers, so any architecture transformers runs can be exported
without a per-architecture config.

The graph's interface follows Optimum's ``text-generation(-with-past)`` layout, which
ONNX Runtime GenAI tools and ``ORTModelForCausalLM`` know:

- inputs ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past + sequence],
  ``position_ids`` [batch, sequence], and with past ``past_key_values.{i}.key`` / ``.value``
  [batch, kv_heads, past, head_dim] (past may be 0: one graph does prefill and decode);
- outputs ``logits`` [batch, sequence, vocab] and with past ``present.{i}.key`` / ``.value``.

A small wrapper module turns the flat past tensors into a transformers ``DynamicCache`` and
the returned cache back into flat tensors. The model is exported in eval mode and checked
to still be in eval mode after tracing (a wrapper can leave dropout on).

Weights past ~2 GB go to an external data file next to the graph (``model.onnx.data``; its
name is recorded inside ``model.onnx``, so the two travel together under these names).

The exporter annotates every node and value with debugging metadata (``pkg.torch.onnx.stack_trace``:
``File "/home/<user>/<clone>/stages/onnx/exporter.py", line 84``, module names, FX nodes): megabytes
that name the machine's paths, so the same model exported in two checkouts differed. :func:`scrub`
drops it from every place ONNX keeps ``metadata_props`` before the graph is saved for good.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights: protobuf's limit is 2 GiB for the whole graph
DATA_SUFFIX = ".data"
DIM_NAMES = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
             "total": "total_sequence_length"}


@dataclass
class ExportResult:
    files: list[str]
    opset: int
    inputs: list[str]
    outputs: list[str]
    external_data: bool
    layers: int
    kv_heads: int | None = None
    head_dim: int | None = None


def load_model(model_dir: Path, dtype: str):
    """The merged model in eval mode, in ``dtype`` (float32 / float16), on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.config.use_cache = True
    return model.eval()


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's KV cache, from its config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv, head_dim


def _wrapper(model, with_past: bool, layers: int):
    import torch

    class Decoder(torch.nn.Module):
        """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` with flat tensors."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past=()):
            cache = None
            if with_past:
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                for i in range(layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=with_past)
            if not with_past:
                return (out.logits,)
            return (out.logits, *_flat(out.past_key_values, layers))

    return Decoder().eval()


def _flat(cache, layers: int) -> list:
    out = []
    for i in range(layers):
        if hasattr(cache, "layers"):
            out += [cache.layers[i].keys, cache.layers[i].values]
        else:  # older transformers
            out += [cache.key_cache[i], cache.value_cache[i]]
    return out


def export(model, out_path: Path, *, with_past: bool, opset: int | None = None, external_data: str = "auto",
           optimize: bool = True) -> ExportResult:
    """Export ``model`` (a transformers causal LM in eval mode) to ``out_path`` (``.../model.onnx``).

    ``external_data``: ``auto`` (past ~2 GB of weights), ``always`` or ``never``; ``optimize``: run
    onnxscript's optimizer on the graph (constant folding, fusions).

    Example::

        model = load_model(Path("runs/x/merge"), "float32")
        export(model, Path("out/model.onnx"), with_past=True)
    """
    import torch

    layers, kv, head_dim = cache_shape(model)
    dtype = next(model.parameters()).dtype
    wrapper = _wrapper(model, with_past, layers)
    batch, seq, past_len = 2, 5, 3
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else \
        model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    total = seq + (past_len if with_past else 0)
    mask = torch.ones(batch, total, dtype=torch.long)
    pos = torch.arange(total - seq, total).unsqueeze(0).expand(batch, -1).contiguous()
    past = tuple(torch.randn(batch, kv, past_len, head_dim, generator=gen).to(dtype) * 0.5
                 for _ in range(2 * layers)) if with_past else ()
    D = torch.export.Dim
    b, s, p = D("batch_size"), D("sequence_length"), D("past_sequence_length")
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: D.DYNAMIC}, "position_ids": {0: b, 1: s}}
    args = (ids, mask, pos)
    if with_past:
        shapes["past"] = tuple({0: b, 2: p} for _ in past)
        args += (past,)
    inputs = ["input_ids", "attention_mask", "position_ids"] + \
        [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")] * with_past
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")] * with_past
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = external_data == "always" or (external_data == "auto" and weight_bytes > EXTERNAL_DATA_THRESHOLD)
    with torch.no_grad():
        program = torch.onnx.export(wrapper, args, dynamic_shapes=shapes, input_names=inputs,
                                    output_names=outputs, opset_version=opset, dynamo=True, optimize=optimize)
    if model.training or wrapper.training:
        raise RuntimeError("the model left eval mode while it was exported")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out_path), external_data=external)
    _name_dims(out_path, with_past)  # and scrubs the exporter's debugging metadata
    files = [out_path.name] + ([out_path.name + DATA_SUFFIX] if (out_path.parent / (out_path.name + DATA_SUFFIX)).exists()
                               else [])
    opset_used = _opset(out_path)
    return ExportResult(files=files, opset=opset_used, inputs=inputs, outputs=outputs, external_data=len(files) > 1,
                        layers=layers, kv_heads=kv, head_dim=head_dim)


def root_cause(e: BaseException) -> str:
    """The innermost exception's first meaningful line (the exporter wraps the real error in
    several layers of advice)."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def _name_dims(path: Path, with_past: bool) -> None:
    """Give the graph's symbolic dimensions readable names (the exporter's are ``s0``, ``s1``...):
    batch_size, sequence_length, past_sequence_length, total_sequence_length; :func:`scrub` it; save."""
    import re

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    by_name = {v.name: v for v in list(g.input) + list(g.output)}
    rename = {}

    def sym(value, axis):
        d = by_name[value].type.tensor_type.shape.dim[axis]
        return d.dim_param if d.HasField("dim_param") else None

    pairs = [("input_ids", 0, "batch"), ("input_ids", 1, "seq"), ("attention_mask", 1, "total")]
    if with_past:
        pairs.append(("past_key_values.0.key", 2, "past"))
    for value, axis, kind in pairs:
        s = sym(value, axis) if value in by_name else None
        if s and re.fullmatch(r"[A-Za-z_]\w*", s) and s not in rename:
            rename[s] = DIM_NAMES[kind]
    if rename:
        _rename_dims(g, rename)
    scrub(m)
    onnx.save(m, str(path))


def _rename_dims(g, rename: dict) -> None:
    import re

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")

    def fix(shape):
        for d in shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = pattern.sub(lambda mo: rename[mo.group(1)], d.dim_param)

    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            fix(v.type.tensor_type.shape)


def scrub_file(path: Path) -> int:
    """:func:`scrub` a saved graph in place (its external data stays where it is); rewritten only
    when something was dropped (ONNX Runtime's quantizers copy what they read)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    dropped = scrub(m)
    if dropped:
        onnx.save(m, str(path))
    return dropped


# metadata keys the torch exporter writes for debugging: stack traces with local file paths, module
# and FX node names, export signatures. Nothing that runs the graph reads them.
SCRUBBED_PREFIXES = ("pkg.torch.",)
SCRUBBED_KEYS = ("namespace",)


def scrub(message) -> int:
    """Drop the exporter's debugging metadata (``pkg.torch.*`` and ``namespace`` entries of
    ``metadata_props``) and node doc strings from an ONNX proto and everything inside it: the
    model, graphs and subgraphs, nodes, values, initializers, functions. Returns how many
    entries were dropped. Generic over the proto's fields, so a place a future onnx adds
    ``metadata_props`` to is covered too."""
    from google.protobuf.descriptor import FieldDescriptor

    dropped = 0
    fields = message.DESCRIPTOR.fields_by_name
    if "metadata_props" in fields:
        props = message.metadata_props
        keep = [(p.key, p.value) for p in props
                if not (p.key.startswith(SCRUBBED_PREFIXES) or p.key in SCRUBBED_KEYS)]
        if len(keep) != len(props):
            dropped += len(props) - len(keep)
            del props[:]
            for key, value in keep:
                props.add(key=key, value=value)
    if message.DESCRIPTOR.name == "NodeProto" and message.doc_string:
        message.doc_string = ""
        dropped += 1
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        items = [value] if hasattr(value, "DESCRIPTOR") else value  # one message, or a repeated field
        for item in items:
            dropped += scrub(item)
    return dropped
