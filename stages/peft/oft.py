"""OFT (orthogonal fine-tuning): W' = (R @ W^T)^T (an embedding: W' = W @ R; a Conv2d: on its
(out, in·k·k) view), R block-diagonal: orthogonal b×b blocks (one, repeated, with ``block_share``),
the Cayley transform (or its Neumann series) of the adapter's skew-symmetric parameters (``coft``
projects them first). A function of W0.

The blocks are peft's: its ``OFTRotationModule``, built from the adapter config as peft's layers
build it, makes them as its ``get_weight()`` does. peft then makes R a dense in×in float32 matrix
(``torch.block_diag``: 820 MB for a Llama-3-8B down_proj, 3.3 GB for a 70B one) for one
``torch.mm``. Fuse never does: :func:`block_rotate` builds R a strip of rows at a time and
multiplies each strip over all of in_features, which gives those rows of peft's product bit for
bit (a row of a product does not depend on the rows computed with it), in a few MiB.

Not b×b products per block (in·b·out flops instead of peft's in²·out): MKL sums a long product in
panels (192 wide here, measured), so a block crossing a panel edge (b=128 at 192) adds its terms in
another order, far off peft where they cancel (27202 float32 ulps, 10 bf16 ulps measured).
"""
from __future__ import annotations

import math

from stages.peft import family as fam

PEFT_TYPE = "OFT"
NAME = "OFT"
SUFFIXES = {".oft_R.weight": ("weight", "oft_R.weight"),
            ".oft_embedding_R.weight": ("weight", "oft_embedding_R.weight")}
LAYOUTS = ("linear", "conv2d", "embedding")
STRIP_BYTES = 4 << 20  # float32 bytes of R held at a time (R whole when it is no larger)
STRIP_ALIGN = 64  # strip edges: MKL splits a 64-aligned strip among threads as it splits peft's whole product


def check_config(config: dict, path) -> None:
    fam.require_number(config, path, "r", "oft_block_size", allow_zero=True)


def make_update(index, adapter, module, param, roles, target, ctx=None):
    from stages.peft.plan import Update

    lay = fam.layout(target, module)
    if lay not in LAYOUTS:
        raise fam.unsupported_layout(adapter, module, roles, target, NAME, lay, LAYOUTS)
    role = "oft_embedding_R.weight" if lay == "embedding" else "oft_R.weight"
    if set(roles) != {role}:
        raise fam.incomplete(adapter, module, roles, f"OFT on a {lay} weight ({role})")
    fam.refuse_weight(adapter, roles, "OFT", ctx.method if ctx else "linear")
    shape = adapter.tensors[roles[role]].shape
    in_f = target.shape[1] * math.prod(target.shape[2:])
    block = (1 + math.isqrt(1 + 8 * shape[1])) // 2 if len(shape) == 2 else 0
    if len(shape) != 2 or block * (block - 1) // 2 != shape[1] or block == 0 or in_f % block \
            or shape[0] != (1 if adapter.config.get("block_share") else in_f // block):
        raise fam.shape_error(adapter, module, roles, target, {role: shape})
    if lay == "conv2d" and target.shape[2] != target.shape[3]:
        raise fam.shape_error(adapter, module, roles, target, {role: shape}, "peft's OFT takes square kernels only")
    return Update(adapter=index, kind="multiplicative", module=module, tensors=dict(roles), peft_type=PEFT_TYPE,
                  weight=adapter.weight, extra={"layout": lay})


def rotation_blocks(R, in_features: int, config):
    """R's blocks, (r or 1, b, b), from peft's ``OFTRotationModule`` as its ``get_weight()`` makes them,
    without the ``torch.block_diag``. peft's layer is not built: it adds nothing to the blocks, and
    building it probes (imports) every quantization backend installed."""
    import torch
    from peft.tuners.oft.layer import OFTRotationModule

    block = (1 + math.isqrt(1 + 8 * R.shape[1])) // 2
    rot = OFTRotationModule(R.shape[0], R.shape[1], block, in_features, coft=config.coft, eps=config.eps,
                            block_share=config.block_share, use_cayley_neumann=config.use_cayley_neumann,
                            num_cayley_neumann_terms=config.num_cayley_neumann_terms)
    with torch.no_grad():
        rot.weight.copy_(R)
        weight = rot._project_batch(rot.weight, eps=rot.eps) if rot.coft else rot.weight
        return rot._cayley_batch(weight, rot.block_size, rot.use_cayley_neumann, rot.num_cayley_neumann_terms)


def strips(n: int) -> list[tuple[int, int]]:
    """R's rows in strips of about :data:`STRIP_BYTES`, edges at multiples of :data:`STRIP_ALIGN` (n's own
    remainder joins the last strip)."""
    step = max(STRIP_ALIGN, STRIP_BYTES // (4 * n) // STRIP_ALIGN * STRIP_ALIGN)
    edges = list(range(0, n, step))
    if len(edges) > 1 and n - edges[-1] < STRIP_ALIGN:
        edges.pop()
    return list(zip(edges, edges[1:] + [n]))


def block_rotate(W, blocks, *, embedding: bool = False):
    """``(R @ W.t()).t()`` (``W @ R`` for an embedding) with ``R = block_diag(blocks)`` (one block:
    repeated), bit for bit as peft's ``torch.mm`` on the dense R, without it: R's rows (columns) a
    strip at a time, each multiplied over all of in_features (see the module docstring).

    A strip whose width is no multiple of :data:`STRIP_ALIGN` (73, 200, 260 measured) can come out
    otherwise with 4+ threads than with one (MKL splits it differently); it is multiplied on one
    thread, which gives peft's product whatever the thread count (MKL's products give the same bits
    on one thread and on many)."""
    import torch

    n, b = W.shape[1], blocks.shape[-1]
    out = torch.empty_like(W)
    bounds, threads = strips(n), torch.get_num_threads()
    for i0, i1 in bounds:
        strip = torch.zeros((n, i1 - i0) if embedding else (i1 - i0, n))  # R[:, i0:i1] or R[i0:i1]
        for j in range(i0 // b, -(-i1 // b)):
            lo, hi = max(i0, j * b), min(i1, (j + 1) * b)
            block = blocks[0 if len(blocks) == 1 else j]
            if embedding:
                strip[j * b:(j + 1) * b, lo - i0:hi - i0] = block[:, lo - j * b:hi - j * b]
            else:
                strip[lo - i0:hi - i0, j * b:(j + 1) * b] = block[lo - j * b:hi - j * b]
        one = threads > 1 and len(bounds) > 1 and (i1 - i0) % STRIP_ALIGN != 0
        if one:
            torch.set_num_threads(1)
        try:
            out[:, i0:i1] = torch.mm(W, strip) if embedding else torch.mm(strip, W.t()).t()
        finally:
            if one:
                torch.set_num_threads(threads)
    return out


def apply(W, W0, update, t, adapter=None):
    from stages.peft.layers import peft_config

    embedding = update.extra["layout"] == "embedding"
    flat = W.reshape(W.shape[0], -1)
    blocks = rotation_blocks(next(iter(t.values())), flat.shape[1], peft_config(adapter))
    return block_rotate(flat, blocks, embedding=embedding).view(W.shape)
