"""A checkpoint of the bundled model's exact shape and tokenizer, with random bf16 weights.

A step's speed does not depend on the weights' values, so where the bundled model cannot be
fetched (a machine that reaches no network), the speed benchmarks run on this instead; its
tokens are meaningless. Built in seconds from benchmarks/data/smollm2-135m-shape: the converted
bundled model's config.json, generation_config.json and tokenizer files (SmolLM2-135M-Instruct,
Apache-2.0, by Hugging Face).

    python benchmarks/synthetic_model.py OUT_DIR
"""
import argparse
import shutil
from pathlib import Path

import torch

SHAPE_DIR = Path(__file__).resolve().parent / "data" / "smollm2-135m-shape"
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def build_synthetic_model(out_dir: Path, seed: int = 0) -> None:
    """Write config.json, model.safetensors (bf16, transformers' random init) and the tokenizer
    files into out_dir, which must not exist yet."""
    from transformers import AutoConfig, AutoModelForCausalLM
    out_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(SHAPE_DIR)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    for name in COPIED:
        shutil.copy(SHAPE_DIR / name, out_dir / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="a new directory for the checkpoint")
    args = parser.parse_args()
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} already exists: pass a new directory")
    build_synthetic_model(args.out_dir)
    print(f"random weights of the bundled model's shape in {args.out_dir}: speed only")


if __name__ == "__main__":
    main()
