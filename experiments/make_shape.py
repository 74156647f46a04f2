"""A random-init model with SmolLM2-360M's shapes, to see how the decode floor scales with model size.

    python experiments/make_shape.py runs/shape360
    gateskip bench --model runs/shape360 --random-gates ...   (BENCHMARKS.md)

Same family, vocabulary and tokenizer as the embedded SmolLM2-135M (so the same LM head), with the
360M model's layer shapes. Only timings are meaningful: the weights are random.
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gateskip.models import _resolve

SHAPES_360M = dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                   intermediate_size=2560)


def main(out: str) -> None:
    src = Path(_resolve("smollm2-135m", None)[0])
    cfg = AutoConfig.from_pretrained(src)
    cfg.update(SHAPES_360M)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, Path(out) / f.name)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
