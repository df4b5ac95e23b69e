"""Every adapter family and LoRA variant against its oracle.

- The merged tensors against peft's ``merge_and_unload()`` (same dtype: identical or within
  one unit in the last place) and the merged model's logits against the unmerged PeftModel.
- Where peft has no equivalent (TIES/DARE on full updates, an NF4 round-trip base, a
  bitsandbytes checkpoint dequantized), against the formula computed here, independently,
  from peft's per-module deltas, peft's ``merge_utils`` and bitsandbytes' own functions.

The default run covers each family once on a tiny Llama (plus bf16, GPT-2 and conv cases);
``FUSE_SLOW=1`` / ``-m slow`` runs the whole family x architecture matrix.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.findings import FuseError
from stages.io.safetensors import ModelWeights
from stages.peft.adapter import load_adapter
from stages.peft.merge import merge_model
from stages.peft.plan import plan_merge

from factory import (SENTENCES, assert_logits_match, load_conv_model, make_conv_model, make_lora_adapter, make_peft_adapter,
                     make_tiny_model)

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "fixtures" / "stories260K-hf"
IDS = torch.tensor([SENTENCES[0][:8], SENTENCES[2][:8]])
ATTN_MLP = ["q_proj", "v_proj", "down_proj"]
# the whole matrix: `FUSE_SLOW=1 pytest -m slow tests/test_families.py` (CI runs the reduced form)
slow = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("FUSE_SLOW"), reason="FUSE_SLOW=1 runs the matrix")]


# ---------------------------------------------------------------- helpers

def peft_merged(base, adapter, dtype=torch.float32, model=None):
    """(unmerged PeftModel logits, merge_and_unload state dict, merged logits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = model if model is not None else AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
        merged = peft_model.merge_and_unload()
        return unmerged, merged.state_dict(), merged(IDS).logits


def logits_of(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    with torch.no_grad():
        return model(IDS).logits


def read_output(out_dir) -> dict:
    tensors = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def ulps(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (ours.dtype, ref.dtype, ours.shape, ref.shape)
    if torch.equal(ours, ref):
        return 0.0
    a = ref.abs()
    ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()
    return ((ours.float() - ref.float()).abs() / ulp).max().item()


def rotation_blocks_of(adapter) -> dict:
    """{module path: block size b} of an OFT/BOFT adapter, from its saved R's shape (b(b-1)/2 columns)."""
    import json
    import math

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if config.get("peft_type") not in ("OFT", "BOFT"):
        return {}
    out, scales = {}, {}
    for name, t in load_file(Path(adapter) / "adapter_model.safetensors").items():
        module = name.split(".oft_")[0].split(".boft_")[0].removeprefix("base_model.model.")
        if ".boft_s" in name:
            scales[module] = max(1.0, t.abs().max().item())
        elif ".boft_R" in name:
            out[module] = (t.shape[-1], 1.0)
        else:
            out[module] = ((1 + math.isqrt(1 + 8 * t.shape[-1])) // 2, 1.0)
    return {m: (b, scales.get(m, s)) for m, (b, s) in out.items()}


def within_rotation_bound(name, ours, ref, base_tensor, b, scale=1.0) -> bool:
    """A float32 rotation (OFT/BOFT: each element a sum of b products R_ik·W_jk) is within the summation-
    order bound of peft's, 2·γ_b·Σ|R_ik||W_jk| ≤ 2·γ_b·‖R_i‖·‖W_j over the block‖ (‖R_i‖ ≈ 1, orthogonal;
    1.5 allows for Neumann's approximation): BLAS kernels sum in an order that depends on the CPU
    (docs/merging.md), so bit identity is not promised, this is."""
    u = 2.0 ** -24
    gamma = b * u / (1 - b * u)
    W = base_tensor.double().reshape(base_tensor.shape[0], -1)
    if name.endswith("embed_tokens.weight"):
        W = W.t()  # W @ R: the sums run down W's columns
    norms = W.reshape(W.shape[0], -1, b).pow(2).sum(-1).sqrt().repeat_interleave(b, dim=1)
    if name.endswith("embed_tokens.weight"):
        norms = norms.t()
    bound = 2 * gamma * 1.5 * scale * norms.reshape(ours.shape)  # BOFT: times its scale boft_s
    return bool(((ours.double() - ref.double()).abs() <= bound).all())


def assert_matches(out_dir, ref_state: dict, *, changed_at_least: int = 1, base=None, adapter=None) -> dict:
    """Every output tensor within 1 ulp of peft's (a float32 OFT/BOFT rotation: or within its summation-
    order bound, see :func:`within_rotation_bound`); at least ``changed_at_least`` differ from the base."""
    ours = read_output(out_dir)
    assert set(ours) <= set(ref_state), set(ours) - set(ref_state)
    blocks = rotation_blocks_of(adapter) if adapter is not None else {}
    before = read_output(base) if base is not None else {}
    for name, tensor in ours.items():
        worst = ulps(tensor, ref_state[name])
        b, scale = blocks.get(name.removesuffix(".weight"), (None, 1.0))
        if worst > 1.0 and b and tensor.dtype == torch.float32 and name in before:
            assert within_rotation_bound(name, tensor, ref_state[name], before[name], b, scale), \
                f"{name}: differs from peft by {worst:.2f} ulp, beyond the summation-order bound"
            continue
        assert worst <= 1.0, f"{name}: differs from peft by {worst:.2f} ulp"
    if base is not None:
        changed = [n for n in ours if n in before and not torch.equal(ours[n], before[n])]
        assert len(changed) >= changed_at_least, changed
    return ours


def check_family(base, adapter, tmp_path, dtype=torch.float32, atol=2e-5, min_changed=1, **merge_kwargs):
    report = merge_model(base, [(adapter, 1.0)], tmp_path / "out", **merge_kwargs)
    unmerged, ref_state, ref_logits = peft_merged(base, adapter, dtype)
    assert_matches(tmp_path / "out", ref_state, base=base, changed_at_least=min_changed, adapter=adapter)
    if dtype == torch.float32:
        assert_logits_match(logits_of(tmp_path / "out"), unmerged, per_unit=atol)
    else:  # same dtype as peft's merged model: its logits are the oracle of the rounding
        torch.testing.assert_close(logits_of(tmp_path / "out", dtype), ref_logits, atol=0.05, rtol=0)
    return report


def family_configs():
    """peft_type -> a function(targets) making a config that exercises the family's options."""
    from peft import AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig, VeraConfig

    return {
        "loha": lambda t: LoHaConfig(r=4, alpha=8, target_modules=t, rank_pattern={"down_proj": 2},
                                     alpha_pattern={"v_proj": 3}),
        "lokr": lambda t: LoKrConfig(r=4, alpha=6, target_modules=t, decompose_both=True, decompose_factor=4,
                                     rank_pattern={"down_proj": 2}),
        "ia3": lambda t: IA3Config(target_modules=t, feedforward_modules=[m for m in t if "down" in m or "fc" in m
                                                                          or m == "c_proj"]),
        "oft": lambda t: OFTConfig(r=0, oft_block_size=8, target_modules=t),
        "oft_cayley": lambda t: OFTConfig(r=4, oft_block_size=0, target_modules=t, use_cayley_neumann=False,
                                          block_share=False),
        "oft_share": lambda t: OFTConfig(r=0, oft_block_size=16, target_modules=t, block_share=True,
                                         num_cayley_neumann_terms=3),
        "boft": lambda t: BOFTConfig(boft_block_size=8, target_modules=t),
        "vera": lambda t: VeraConfig(r=8, target_modules=t, save_projection=False, projection_prng_key=7),
        "vera_saved": lambda t: VeraConfig(r=8, target_modules=t, save_projection=True),
        "adalora": lambda t: AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=t, total_step=10),
    }


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), layers=1, seed=1)


@pytest.fixture(scope="module")
def qwen2_bf16(tmp_path_factory):
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), layers=1, dtype=torch.bfloat16, seed=3)


# ---------------------------------------------------------------- families vs peft

@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3", "oft", "oft_cayley", "oft_share", "boft", "vera",
                                  "vera_saved", "adalora"])
def test_family_matches_peft(llama, tmp_path, kind):
    adapter = make_peft_adapter(llama, tmp_path / "a", family_configs()[kind](ATTN_MLP), seed=4)
    report = check_family(llama, adapter, tmp_path, min_changed=3)
    assert report.metrics["tensors_merged"] == 3


def test_adalora_rank_pattern_masks(llama, tmp_path):
    """AdaLoRA's saved tensors hold only the ranks rank_pattern kept; the scale still divides by init_r."""
    from peft import AdaLoraConfig

    keep = [True, False, True, True, False, False]
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, target_modules=ATTN_MLP, total_step=10,
                           rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": keep,
                                         "model.layers.0.mlp.down_proj.lora_E": [False] * 5 + [True]})
    adapter = make_peft_adapter(llama, tmp_path / "a", config, seed=5)
    shapes = {k: v.shape for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A"][0] == 3
    check_family(llama, adapter, tmp_path, min_changed=3)


def test_vera_regenerated_projections_equal_saved_ones(llama, tmp_path):
    """save_projection=false: Fuse regenerates A/B from projection_prng_key; same bytes as when they were saved."""
    from peft import VeraConfig

    saved = make_peft_adapter(llama, tmp_path / "s", VeraConfig(r=8, target_modules=ATTN_MLP, projection_prng_key=3),
                              seed=6)
    bare = tmp_path / "bare"
    shutil.copytree(saved, bare)
    tensors = load_file(bare / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(tensors)
    del tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    save_file(tensors, bare / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((bare / "adapter_config.json").read_text())
    config["save_projection"] = False
    (bare / "adapter_config.json").write_text(json.dumps(config))
    a = merge_model(llama, [(saved, 1.0)], tmp_path / "a")
    b = merge_model(llama, [(bare, 1.0)], tmp_path / "b")
    assert a.hashes["model.safetensors"] == b.hashes["model.safetensors"]
    config["projection_prng_key"] = 4
    (bare / "adapter_config.json").write_text(json.dumps(config))
    c = merge_model(llama, [(bare, 1.0)], tmp_path / "c")
    assert c.hashes["model.safetensors"] != a.hashes["model.safetensors"]


@pytest.mark.parametrize("kind", ["loha", "ia3", "oft", "adalora"])
def test_family_bf16_with_biases(qwen2_bf16, tmp_path, kind):
    """bf16 base, q/k/v biases (IA3 scales them too): one rounding, same as peft's."""
    targets = ["q_proj", "k_proj", "down_proj"]
    adapter = make_peft_adapter(qwen2_bf16, tmp_path / "a", family_configs()[kind](targets), seed=7)
    report = check_family(qwen2_bf16, adapter, tmp_path, dtype=torch.bfloat16)
    # IA3 also scales the biases of q_proj and k_proj (not of the feed-forward down_proj)
    assert report.metrics["tensors_merged"] == (5 if kind == "ia3" else 3)


@pytest.mark.parametrize("kind", ["ia3", "vera", "adalora"])
def test_gpt2_conv1d_families(tmp_path, kind):
    base = make_tiny_model("gpt2", tmp_path / "gpt2", layers=1, seed=8)
    config = family_configs()[kind](["c_attn", "c_proj"])
    config.fan_in_fan_out = True
    adapter = make_peft_adapter(base, tmp_path / "a", config, seed=9)
    check_family(base, adapter, tmp_path, min_changed=2)


# ---------------------------------------------------------------- OFT / BOFT: R in strips

def wide_llama(out_dir, intermediate: int) -> Path:
    """A one-layer Llama whose down_proj has ``intermediate`` in_features."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=intermediate,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return Path(out_dir)


def check_coft(base, adapter, tmp_path, dtype):
    """coft: peft's forward projects oft_R in place (OFTRotationModule.forward), so its merge after a
    forward projects the saved weights twice (117 ulps apart here). The oracle is the merge of the
    adapter as loaded (one projection, as Fuse), and in float32 the unmerged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merge_model(base, [(adapter, 1.0)], tmp_path / "out")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    with torch.no_grad():
        assert_matches(tmp_path / "out", loaded.merge_and_unload().state_dict(), base=base, adapter=adapter)
    if dtype == torch.float32:
        assert_logits_match(logits_of(tmp_path / "out"), peft_merged(base, adapter)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["oft", "oft_cayley", "oft_share", "oft_coft", "oft_embedding", "boft"])
def test_rotations_in_strips_match_peft(llama, qwen2_bf16, tmp_path, monkeypatch, kind, dtype):
    """R is built 16 rows (columns, for an embedding) at a time here, several strips per tensor; every
    strip is multiplied over all of in_features, so the merge is peft's dense product."""
    from peft import OFTConfig

    import stages.peft.oft as oft

    monkeypatch.setattr(oft, "STRIP_BYTES", 0)
    monkeypatch.setattr(oft, "STRIP_ALIGN", 16)
    base = llama if dtype == torch.float32 else qwen2_bf16
    targets = ["embed_tokens", "q_proj"] if kind == "oft_embedding" else ["q_proj", "k_proj", "down_proj"]
    if kind == "oft_coft":
        config = OFTConfig(r=0, oft_block_size=8, target_modules=targets, coft=True, eps=0.2)
        return check_coft(base, make_peft_adapter(base, tmp_path / "a", config, seed=8), tmp_path, dtype)
    config = family_configs()["oft" if kind == "oft_embedding" else kind](targets)
    report = check_family(base, make_peft_adapter(base, tmp_path / "a", config, seed=8), tmp_path, dtype=dtype)
    assert report.metrics["tensors_merged"] == len(targets)


def blockwise(W, blocks, embedding: bool):
    """(exact, bound): the product of W with R = block_diag(blocks) in float64, block by block (einsum, no dense
    R), and the elementwise bound on how far two float32 evaluations that sum in different orders can be
    apart: 2·γ_b·(|R|·|W|), γ_b = b·u / (1 - b·u), u = 2⁻²⁴, b terms per sum (Higham, Accuracy and Stability,
    §3.5). BLAS kernels pick the order per CPU, shape and thread count."""
    out_f, n = W.shape
    b = blocks.shape[-1]
    R = blocks.double().expand(n // b, b, b)
    Wb = W.double().reshape(out_f, n // b, b)
    spec = "jmk,mki->jmi" if embedding else "jmk,mik->jmi"  # W @ R, or (R @ W.t()).t()
    exact = torch.einsum(spec, Wb, R).reshape(out_f, n)
    u = 2.0 ** -24
    gamma = b * u / (1 - b * u)
    return exact, 2 * gamma * torch.einsum(spec, Wb.abs(), R.abs()).reshape(out_f, n)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_oft_block_rotate_is_the_dense_product(monkeypatch, threads):
    """R's strips (64-aligned; an unaligned remainder on one thread) multiplied over all of in_features give
    peft's dense product up to the order of summation, on any CPU and thread count: within the float32
    summation bound of it, and as close as it to the exact (float64) product. Bit identity is not asserted:
    it holds on some CPUs (AVX2 here) and not on others (AVX-512 MKL splits an unaligned remainder
    differently, 1-2 ulp). A misplaced block or a wrong strip is off by far more than the bound."""
    import stages.peft.oft as oft

    monkeypatch.setattr(oft, "STRIP_BYTES", 0)  # strips of 64
    gen = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_f, n, b in [(256, 2048, 128), (77, 1100, 4), (300, 1544, 8)]:
            blocks = torch.linalg.qr(torch.randn(n // b, b, b, generator=gen))[0]
            W = torch.randn(out_f, n, generator=gen)
            for R in (blocks, blocks[:1]):  # one block: shared
                dense = torch.block_diag(*R.expand(n // b, b, b))
                for embedding in (False, True):
                    ours = oft.block_rotate(W, R, embedding=embedding).double()
                    ref = torch.mm(W, dense) if embedding else torch.mm(dense, W.t()).t()  # peft's product
                    exact, bound = blockwise(W, R, embedding)
                    where = (out_f, n, b, len(R), embedding)
                    assert ((ours - ref.double()).abs() <= bound).all(), where
                    assert ((ours - exact).abs() <= bound / 2).all(), where
    finally:
        torch.set_num_threads(before)


def test_summation_bound_catches_a_misplaced_block():
    """The bound above is tight enough to fail a real mistake: two blocks swapped."""
    import stages.peft.oft as oft

    gen = torch.Generator().manual_seed(1)
    n, b = 256, 8
    blocks = torch.linalg.qr(torch.randn(n // b, b, b, generator=gen))[0]
    W = torch.randn(64, n, generator=gen)
    swapped = blocks.clone()
    swapped[[3, 4]] = blocks[[4, 3]]
    exact, bound = blockwise(W, blocks, embedding=False)
    assert not ((oft.block_rotate(W, swapped).double() - exact).abs() <= bound).all()
    assert ((oft.block_rotate(W, blocks).double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("kind,block", [("oft", 8), ("oft", 128), ("boft", 128)])
def test_rotation_of_a_wide_layer_matches_peft(tmp_path, kind, block):
    """in_features 2048: R is built in strips of 512 rows with the default STRIP_BYTES. Blocks of 128
    cross MKL's 192-wide panels, where b x b products per block would differ from peft."""
    from peft import BOFTConfig, OFTConfig

    base = wide_llama(tmp_path / "base", 2048)
    config = OFTConfig(r=0, oft_block_size=block, target_modules=["down_proj"]) if kind == "oft" else \
        BOFTConfig(boft_block_size=block, target_modules=["down_proj"])
    check_family(base, make_peft_adapter(base, tmp_path / "a", config, seed=9), tmp_path)


@slow[0]
@slow[1]
@pytest.mark.parametrize("block", [8, 256])
def test_oft_on_a_16384_wide_layer_matches_peft(tmp_path, block):
    """A down_proj 16384 wide (peft's dense R: 1 GiB): 256 strips of 64 rows."""
    from peft import OFTConfig

    base = wide_llama(tmp_path / "base", 16384)
    config = OFTConfig(r=0, oft_block_size=block, target_modules=["down_proj"])
    check_family(base, make_peft_adapter(base, tmp_path / "a", config, seed=10), tmp_path)


# ---------------------------------------------------------------- convolutions

def conv_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 5, generator=gen), torch.randn(2, 8, 6, 6, generator=gen)


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr", "ia3", "oft", "boft", "oft-strips", "boft-strips"])
def test_conv_layers_match_peft(tmp_path, monkeypatch, kind):
    from peft import (BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel,
                      get_peft_model)

    if kind.endswith("-strips"):  # R of conv2 (in·k·k = 72) in strips of 16 rows (and 24)
        import stages.peft.oft as oft

        monkeypatch.setattr(oft, "STRIP_BYTES", 0)
        monkeypatch.setattr(oft, "STRIP_ALIGN", 16)
        kind = kind.removesuffix("-strips")
    base = make_conv_model(tmp_path / "conv", seed=1)
    conv2d = ["conv2", "point"]
    config = {
        "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "point"], rank_pattern={"point": 3}),
        "dora": LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "point"], use_dora=True),
        "loha": LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "point"], use_effective_conv2d=True),
        "lokr": LoKrConfig(r=2, alpha=4, target_modules=conv2d),
        "ia3": IA3Config(target_modules=conv2d, feedforward_modules=["point"]),
        "oft": OFTConfig(r=0, oft_block_size=4, target_modules=conv2d),
        "boft": BOFTConfig(boft_block_size=4, target_modules=conv2d),
    }[kind]
    model = get_peft_model(load_conv_model(base), config)
    from factory import randomize_adapter

    randomize_adapter(model, seed=2)
    model.save_pretrained(tmp_path / "a")
    merge_model(base, [(tmp_path / "a", 1.0)], tmp_path / "out")

    x1, x2 = conv_inputs()
    peft_model = PeftModel.from_pretrained(load_conv_model(base), tmp_path / "a").eval()
    with torch.no_grad():
        unmerged = peft_model(x1, x2)
        peft_merged_model = peft_model.merge_and_unload()
        ours = assert_matches(tmp_path / "out", peft_merged_model.state_dict(), base=base, changed_at_least=2)
        merged = load_conv_model(base)
        merged.load_state_dict(ours)
        # peft's OFT forward on a padded Conv2d rotates unpadded patches, so its own merged model departs from
        # it (peft 0.21.2); there the oracle is peft's merged model
        oracle = peft_merged_model(x1, x2) if kind == "oft" else unmerged
        assert_logits_match(merged(x1, x2), oracle)


# ---------------------------------------------------------------- LoRA: vocabulary, tokens, bias, experts

@pytest.mark.parametrize("how", ["modules_to_save", "embedding_lora"])
def test_resized_vocabulary(llama, tmp_path, how):
    """Rows added after resize_token_embeddings: the output takes the adapter's embedding and lm_head,
    config.json's vocab_size follows."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    if how == "modules_to_save":
        config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
        adapter = make_peft_adapter(llama, tmp_path / "a", config, seed=3, vocab_size=260)
    else:
        config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens", "lm_head"])
        adapter = make_peft_adapter(llama, tmp_path / "a", config, seed=3, vocab_size=260,
                                    save_embedding_layers=True)
    report = merge_model(llama, [(adapter, 1.0)], tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(llama)
    model.resize_token_embeddings(260)
    peft_model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        ids = torch.cat([IDS, torch.tensor([[257, 259]] * 2)], dim=1)
        unmerged = peft_model(ids).logits
        ref_state = peft_model.merge_and_unload().state_dict()
    ours = assert_matches(tmp_path / "out", ref_state)
    assert ours["model.embed_tokens.weight"].shape[0] == 260 and ours["lm_head.weight"].shape[0] == 260
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 260
    assert report.metrics["vocab_size"] == 260
    out_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert_logits_match(out_model(ids).logits, unmerged)


def test_resized_embedding_without_lm_head_is_f204(llama, tmp_path):
    from peft import LoraConfig

    adapter = make_peft_adapter(llama, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"],
                                modules_to_save=["embed_tokens", "lm_head"]), seed=3, vocab_size=260)
    tensors = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lm_head" not in k}
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FuseError, match="F204.*rows"):
        plan_merge(ModelWeights.open(llama), [load_adapter(adapter)])


@pytest.mark.parametrize("spec", [[3, 5, 7], {"embed_tokens": [3, 200]}])
def test_trainable_token_indices(llama, tmp_path, spec):
    from peft import LoraConfig

    adapter = make_peft_adapter(llama, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"],
                                trainable_token_indices=spec), seed=4)
    check_family(llama, adapter, tmp_path, min_changed=2)
    assert not json.loads((tmp_path / "out" / "config.json").read_text()).get("tie_word_embeddings")


def test_trainable_tokens_alone(llama, tmp_path):
    from peft import TrainableTokensConfig

    adapter = make_peft_adapter(llama, tmp_path / "a", TrainableTokensConfig(target_modules=["embed_tokens"],
                                token_indices=[1, 4, 9]), seed=4)
    check_family(llama, adapter, tmp_path)


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"fixture {STORIES} is absent")
def test_trainable_tokens_on_tied_embeddings_stay_tied(tmp_path):
    """The tied lm_head is the same parameter: peft's trained rows change both, and the tie is kept."""
    from peft import LoraConfig

    adapter = make_peft_adapter(STORIES, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj"],
                                trainable_token_indices=[3, 5]), seed=4)
    report = merge_model(STORIES, [(adapter, 1.0)], tmp_path / "out")
    unmerged, _, _ = peft_merged(STORIES, adapter)
    assert report.metrics["untied_embeddings"] is False
    assert "lm_head.weight" not in read_output(tmp_path / "out")
    assert_logits_match(logits_of(tmp_path / "out"), unmerged)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_all_and_lora_only(qwen2_bf16, tmp_path, bias):
    from peft import LoraConfig

    adapter = make_peft_adapter(qwen2_bf16, tmp_path / "a", LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                bias=bias), seed=5)
    assert any(k.endswith("bias") for k in load_file(adapter / "adapter_model.safetensors"))
    check_family(qwen2_bf16, adapter, tmp_path, dtype=torch.bfloat16, min_changed=3)


def tiny_moe(out_dir, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def test_moe_target_parameters_where_layout_matches(tmp_path):
    """gpt-oss stores its experts as the model holds them (experts, in, out): LoRA on them merges exactly."""
    from peft import LoraConfig

    base = tiny_moe(tmp_path / "gpt_oss", "gpt_oss")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    adapter = make_peft_adapter(base, tmp_path / "a", config, seed=6)
    check_family(base, adapter, tmp_path, atol=1e-4, min_changed=3)


def test_moe_target_parameters_without_a_conversion_is_refused(tmp_path):
    """Experts stored one by one, but config.json names a model type transformers has no conversion mapping
    for (as custom-code MoE models): nothing says how the runtime tensor is built from them, so the merge
    is refused, naming the runtime tensor and what the checkpoint holds. (Mixtral itself merges:
    tests/test_architectures.py.)"""
    from peft import LoraConfig

    base = tiny_moe(tmp_path / "mixtral", "mixtral")
    adapter = make_peft_adapter(base, tmp_path / "a", LoraConfig(r=2, target_modules=[],
                                target_parameters=["mlp.experts.gate_up_proj"]), seed=6)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="my_moe", architectures=["MyMoeForCausalLM"])
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(FuseError) as e:
        merge_model(base, [(adapter, 1.0)], tmp_path / "out")
    assert e.value.finding.code == "F202"
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(e.value)
    assert "block_sparse_moe.experts.0" in str(e.value) and "my_moe" in str(e.value)


# ---------------------------------------------------------------- several adapters: TIES, DARE

def per_module_deltas(base, adapter):
    """{base tensor name: ΔW} from peft's own layers (get_delta_weight), computed here for the oracle."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
                out[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight("default")
    return out


@pytest.fixture(scope="module")
def two_adapters(llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    a = make_lora_adapter(llama, tmp / "a", target_modules=["q_proj", "v_proj"], r=4, seed=11)
    b = make_lora_adapter(llama, tmp / "b", target_modules=["q_proj", "down_proj"], r=2, seed=12)
    return a, b


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_match_the_formula(llama, two_adapters, tmp_path, method):
    from peft.utils import merge_utils

    from stages.peft.combine import dare_seed

    a, b = two_adapters
    weights, density, seed = [0.7, 0.5], 0.4, 1234
    report = merge_model(llama, [(a, weights[0]), (b, weights[1])], tmp_path / "out", method=method,
                         density=density, seed=seed)
    assert report.metrics["method"] == method
    deltas = [per_module_deltas(llama, a), per_module_deltas(llama, b)]
    base, ours = read_output(llama), read_output(tmp_path / "out")
    for name in sorted(set(deltas[0]) | set(deltas[1])):
        present = [i for i in (0, 1) if name in deltas[i]]
        tvs = []
        for i in present:
            if method == "ties":
                tvs.append(merge_utils.prune(deltas[i][name], density, "magnitude"))
            else:  # DARE with the documented per-(seed, adapter, tensor) generator seed
                torch.manual_seed(dare_seed(seed, i, name))
                tvs.append(merge_utils.prune(deltas[i][name], density, "random", rescale=True))
        stacked = torch.stack(tvs)
        w = torch.tensor([weights[i] for i in present]).view(-1, 1, 1)
        if method == "dare_linear":
            mixed = (stacked * w).sum(0)
        else:
            mixed = merge_utils.disjoint_merge(stacked * w, merge_utils.calculate_majority_sign_mask(stacked))
        expected = base[name] + mixed
        assert ulps(ours[name], expected) <= 1.0, name
        if method == "ties":
            assert (ours[name] != base[name]).float().mean() <= density * len(present) + 1e-6
    for name in set(base) - set(deltas[0]) - set(deltas[1]):
        assert torch.equal(ours[name], base[name]), name


def test_dare_seed_makes_runs_reproducible(llama, two_adapters, tmp_path):
    a, b = two_adapters
    runs = [merge_model(llama, [(a, 1.0), (b, 1.0)], tmp_path / f"o{i}", method="dare_linear", density=0.5,
                        seed=seed).hashes["model.safetensors"] for i, seed in enumerate([1, 1, 2])]
    assert runs[0] == runs[1] != runs[2]


def test_ties_on_a_multiplicative_family(llama, tmp_path):
    """Task vectors are full updates W' - W0, so IA3 (a scaling of W0) combines with LoRA in TIES too."""
    from peft import IA3Config, PeftModel
    from transformers import AutoModelForCausalLM

    lora = make_lora_adapter(llama, tmp_path / "lora", target_modules=["q_proj"], r=2, seed=13)
    ia3 = make_peft_adapter(llama, tmp_path / "ia3", IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
                            seed=14)
    merge_model(llama, [(lora, 1.0), (ia3, 0.5)], tmp_path / "out", method="ties", density=1.0)
    name = "model.layers.0.self_attn.q_proj.weight"
    W0 = read_output(llama)[name]
    ia3_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), ia3).merge_and_unload()
    tvs = torch.stack([per_module_deltas(llama, lora)[name], ia3_merged.state_dict()[name] - W0])
    from peft.utils import merge_utils

    mixed = merge_utils.disjoint_merge(tvs * torch.tensor([1.0, 0.5]).view(-1, 1, 1),
                                       merge_utils.calculate_majority_sign_mask(tvs))
    assert ulps(read_output(tmp_path / "out")[name], W0 + mixed) <= 1.0


def test_merge_method_parameters_are_checked(llama, two_adapters, tmp_path):
    a, b = two_adapters
    with pytest.raises(FuseError, match="F104.*density"):
        merge_model(llama, [(a, 1.0), (b, 1.0)], tmp_path / "o", method="ties")
    with pytest.raises(FuseError, match="F104.*seed"):
        merge_model(llama, [(a, 1.0), (b, 1.0)], tmp_path / "o", method="dare_ties", density=0.5)
    with pytest.raises(FuseError, match="F103.*density"):
        merge_model(llama, [(a, 1.0)], tmp_path / "o", method="ties", density=1.5)
    with pytest.raises(FuseError, match="F103.*method"):
        merge_model(llama, [(a, 1.0)], tmp_path / "o", method="svd")


# ---------------------------------------------------------------- QLoRA

@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama_bf16"), layers=1, dtype=torch.bfloat16, seed=2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_base(llama_bf16, tmp_path, double_quant):
    """base_precision nf4: every quantizable linear weight is dequantize(quantize(W)) (+ ΔW where adapted)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    adapter = make_lora_adapter(llama_bf16, tmp_path / "a", target_modules=["q_proj", "down_proj"], seed=15)
    report = merge_model(llama_bf16, [(adapter, 1.0)], tmp_path / "out", base_precision="nf4",
                         nf4_double_quant=double_quant)
    deltas = per_module_deltas(llama_bf16, adapter)
    base, ours = read_output(llama_bf16), read_output(tmp_path / "out")
    linear = [n for n in base if n.endswith("proj.weight")]
    assert report.metrics["nf4_tensors"] == len(linear)
    for name, W in base.items():
        if name in linear:
            q, state = functional.quantize_4bit(W, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            expected = functional.dequantize_4bit(q, state).float()
            if name in deltas:
                expected = expected + deltas[name]
            assert ulps(ours[name], expected.to(torch.bfloat16)) <= 1.0, name
        else:  # embeddings, norms, lm_head: as they were
            assert torch.equal(ours[name], W), name
    assert 0 < report.metrics["update_rel_error"] < 1
    assert report.metrics["update_worst_tensor"] in deltas


def test_update_survival_metric(llama, tmp_path):
    adapter = make_lora_adapter(llama, tmp_path / "a", target_modules=["q_proj"], seed=16, scale=0.003)
    exact = merge_model(llama, [(adapter, 1.0)], tmp_path / "f32").metrics
    rounded = merge_model(llama, [(adapter, 1.0)], tmp_path / "bf16", dtype="bfloat16").metrics
    assert exact["update_rel_error"] == 0 and exact["update_zeroed_fraction"] == 0
    assert rounded["update_rel_error"] > 0.01 and rounded["update_zeroed_fraction"] > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_checkpoint_is_dequantized(llama_bf16, tmp_path, bits):
    """A base saved by transformers with load_in_4bit / load_in_8bit: merged into its dequantized weights
    (bitsandbytes' own dequantize, computed here), written as a plain bf16 model."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True) if bits == 4 \
        else BitsAndBytesConfig(load_in_8bit=True)
    quantized = AutoModelForCausalLM.from_pretrained(llama_bf16, quantization_config=q, device_map="cpu",
                                                     dtype=torch.bfloat16)
    quantized.save_pretrained(tmp_path / "q")
    adapter = make_lora_adapter(llama_bf16, tmp_path / "a", target_modules=["q_proj", "o_proj"], seed=17)
    report = merge_model(tmp_path / "q", [(adapter, 1.0)], tmp_path / "out")
    assert report.metrics["dequantized"].startswith(f"bitsandbytes {bits}-bit")
    deltas = per_module_deltas(llama_bf16, adapter)
    ours = read_output(tmp_path / "out")
    assert set(ours) == set(read_output(llama_bf16))
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or (name + ".weight") not in ours:
            continue
        key = name + ".weight"
        if bits == 4 and hasattr(weight, "quant_state"):
            W = F.dequantize_4bit(weight.data, weight.quant_state)
        elif bits == 8 and getattr(module, "state", None) is not None and weight.dtype == torch.int8:
            W = F.int8_vectorwise_dequant(weight.data, weight.SCB).to(torch.bfloat16)
        else:
            W = weight.data
        expected = (W.float() + deltas[key]) if key in deltas else W.float()
        assert ours[key].dtype == torch.bfloat16
        assert ulps(ours[key], expected.to(torch.bfloat16)) <= 1.0, key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    logits_of(tmp_path / "out", torch.bfloat16)  # loads as a plain model


# ---------------------------------------------------------------- refusals

def write_adapter_dir(path: Path, config: dict, tensors=None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors or {"base_model.model.x.lora_A.weight": torch.zeros(1, 1)}, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("config,reason", [
    ({"peft_type": "XLORA"}, "input-dependent gate"),
    ({"peft_type": "POLY"}, "routes between LoRA skills"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "init_lora_weights": "pissa"}, "changed the base weights"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "init_lora_weights": "olora"}, "changed the base weights"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "init_lora_weights": "loftq"}, "changed the base weights"),
    ({"peft_type": "BOFT", "boft_n_butterfly_factor": 2}, "CUDA extension"),
    ({"config": {"architecture": "bottleneck", "reduction_factor": 16}, "name": "x", "version": "1.0"},
     "bottleneck adapter"),
])
def test_refusals_say_why(tmp_path, config, reason):
    with pytest.raises(FuseError) as e:
        load_adapter(write_adapter_dir(tmp_path / "a", config))
    assert e.value.finding.code == "F202" and reason in str(e.value)


def test_reft_directory_is_refused(tmp_path):
    reft = tmp_path / "reft"
    reft.mkdir()
    (reft / "config.json").write_text(json.dumps({"representations": [{"layer": 4, "component": "block_output"}],
                                                  "intervention_types": ["LoreftIntervention"]}))
    (reft / "intkey_layer_4_comp_block_output_unit_pos_nunit_1#0.bin").write_bytes(b"x")
    with pytest.raises(FuseError) as e:
        load_adapter(reft)
    assert e.value.finding.code == "F202" and "ReFT" in str(e.value)


# ---------------------------------------------------------------- the full matrix (slow)

ARCH_TARGETS = {"llama": ATTN_MLP, "qwen2": ["q_proj", "k_proj", "up_proj"], "mistral": ["v_proj", "gate_proj"],
                "gemma": ["q_proj", "o_proj", "down_proj"], "phi3": ["qkv_proj", "gate_up_proj", "down_proj"]}


@slow[0]
@slow[1]
@pytest.mark.parametrize("arch", sorted(ARCH_TARGETS))
@pytest.mark.parametrize("kind", sorted(family_configs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_family_architecture_matrix(tmp_path, arch, kind, dtype):
    base = make_tiny_model(arch, tmp_path / arch, dtype=dtype, tie=arch == "gemma", seed=20)
    adapter = make_peft_adapter(base, tmp_path / "a", family_configs()[kind](ARCH_TARGETS[arch]), seed=21)
    check_family(base, adapter, tmp_path, dtype=dtype)


@slow[0]
@slow[1]
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"fixture {STORIES} is absent")
@pytest.mark.parametrize("kind", sorted(family_configs()))
def test_families_on_stories260k(tmp_path, kind):
    """A real (trained, tied) model: its larger logits carry peft's own float noise between forward paths."""
    targets = ["q_proj", "v_proj"] if kind == "boft" else ATTN_MLP  # 172 = down_proj's in: no block of 8
    adapter = make_peft_adapter(STORIES, tmp_path / "a", family_configs()[kind](targets), seed=22)
    check_family(STORIES, adapter, tmp_path, atol=2e-4)
