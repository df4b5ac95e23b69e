"""One shared factory for tiny models of real architectures and real PEFT adapters.

Models are built from transformers configs (never downloaded), optionally trained for a
few steps on fixed token ids so their logits are peaked (a random model's near-uniform
logits make top-1 and perplexity checks meaningless), and saved with ``save_pretrained``
(safetensors). Adapters are real peft ``LoraConfig`` adapters with nonzero ``lora_B``.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256

# A few fixed "sentences" of token ids for the optional training and for logit checks.
SENTENCES = [
    [1, 17, 42, 99, 5, 63, 200, 7, 7, 31, 2],
    [1, 88, 13, 150, 42, 99, 5, 12, 250, 2],
    [1, 17, 42, 99, 6, 64, 201, 8, 9, 30, 31, 2],
    [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 2],
    [1, 120, 121, 122, 42, 99, 5, 63, 2],
]


def _llama_like(hidden, layers, tie, **extra):
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **extra)


# arch -> (transformers model_type, function making the config kwargs).
# Add an architecture by adding a line here; keep configs tiny.
ARCHS = {
    "llama": ("llama", _llama_like),
    "qwen2": ("qwen2", _llama_like),
    "mistral": ("mistral", _llama_like),
    "gemma": ("gemma", lambda h, n, t: _llama_like(h, n, t, head_dim=h // 4)),
    "phi3": ("phi3", lambda h, n, t: _llama_like(h, n, t, pad_token_id=0)),
    "gpt2": ("gpt2", lambda h, n, t: {"vocab_size": VOCAB, "n_embd": h, "n_layer": n, "n_head": 4, "n_positions": 128,
                                      "tie_word_embeddings": t, "bos_token_id": 1, "eos_token_id": 2}),
}


def tiny_config(arch: str, *, hidden: int = 64, layers: int = 2, tie: bool = False):
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    model_type, make_kwargs = ARCHS[arch]
    return AutoConfig.for_model(model_type, **make_kwargs(hidden, layers, tie))


def make_tiny_model(arch: str, out_dir, *, hidden: int = 64, layers: int = 2, dtype=torch.float32,
                    train_steps: int = 0, seed: int = 0, tie: bool = False) -> Path:
    """Build, optionally train, and save a tiny causal LM; returns ``out_dir``.

    Training runs in float32 on :data:`SENTENCES` (next-token loss) before the cast to ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden=hidden, layers=layers, tie=tie),
                                             dtype=torch.float32)
    if train_steps:
        _train(model, train_steps)
    model = model.to(dtype).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def _train(model, steps: int) -> None:
    """One thread: a tiny model gains nothing from more, and on a busy 2-core runner the
    threads' barriers made 60 steps take 10-25 s instead of 0.2 s (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(steps):
            ids = torch.tensor([SENTENCES[step % len(SENTENCES)]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)


def make_lora_adapter(model_dir, out_dir, *, target_modules, r: int = 4, alpha: int = 8, use_rslora: bool = False,
                      seed: int = 0, rank_pattern=None, alpha_pattern=None, modules_to_save=None,
                      fan_in_fan_out: bool = False, lora_bias: bool = False, use_dora: bool = False,
                      scale: float = 0.1, **config_kwargs) -> Path:
    """Wrap the model at ``model_dir`` with a real LoRA, randomise every adapter tensor, save it.

    peft initialises ``lora_B`` (and ``lora_embedding_A``) to zero, which would make the delta
    zero and every oracle test vacuous; so every LoRA tensor gets seeded random values.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        modules_to_save=modules_to_save, fan_in_fan_out=fan_in_fan_out, lora_bias=lora_bias,
                        use_dora=use_dora, lora_dropout=0.0, **config_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir


def randomize_adapter(peft_model, *, seed: int = 0, scale: float = 0.1) -> None:
    """Add seeded noise to every trainable parameter of ``peft_model`` (adapter weights, modules_to_save),
    so that no update is zero or an identity (peft initialises most methods to a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale).to(p.dtype))


def make_peft_adapter(model_dir, out_dir, config, *, seed: int = 0, scale: float = 0.1, model=None,
                      vocab_size: int | None = None, **save_kwargs) -> Path:
    """Wrap the model at ``model_dir`` (or ``model``) with any peft ``config``, randomise it, save it.

    ``vocab_size`` resizes the token embeddings first (new rows added after the resize, as a
    tokenizer with added tokens does)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    if vocab_size is not None:
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab_size)
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model, seed=seed, scale=scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


class ConvNet(torch.nn.Module):
    """A tiny model with Conv1d and Conv2d layers (no transformers class has both), for conv adapters."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(channels, channels * 2, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels * 2, 3, padding=1)
        self.point = torch.nn.Conv2d(channels * 2, channels, 1)
        self.head = torch.nn.Linear(channels, 4)

    def forward(self, x1d, x2d):
        a = self.conv1(x1d).mean(-1)
        b = self.point(torch.relu(self.conv2(x2d))).mean((-1, -2))
        return self.head(b) + a[:, :4]


def make_conv_model(out_dir, *, seed: int = 0, dtype=torch.float32) -> Path:
    """Save a :class:`ConvNet` as ``model.safetensors`` (+ an empty config.json); returns ``out_dir``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = ConvNet().to(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text("{}\n")
    return out_dir


def load_conv_model(model_dir, dtype=torch.float32) -> ConvNet:
    from safetensors.torch import load_file

    model = ConvNet().to(dtype)
    model.load_state_dict(load_file(Path(model_dir) / "model.safetensors"))
    return model.eval()


def assert_logits_match(ours, ref, per_unit: float = 2e-5) -> None:
    """Logits of a merged model vs the unmerged oracle's, in float32. The two forwards round differently
    (W0 + ΔW once vs W0·x + B·A·x), by an amount that scales with the logits' magnitude, and the BLAS
    kernel (which differs between CPUs and thread counts) picks the order of every sum; so the tolerance
    is ``per_unit`` times the largest logit (at least 1), not a fixed number. A wrong merge (a scale, a
    transposed or missing update) is off by orders of magnitude more."""
    import torch

    atol = per_unit * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
