"""`python -m minicake.generate "prompt"`: generate a continuation from the command line.

A small command-line front of the offline `LLM` API: the bundled model by default, greedy
unless a temperature is given, the prompt wrapped in the chat template with `--chat`.
"""
import argparse
import logging
import sys
import time

from minicake.config import KERNELS
from minicake.llm import LLM
from minicake.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="+", help="one or more prompts, generated as one batch")
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, local HF directory or hub id")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="auto: the platform's kernels (minicake/platforms); torch: the model's own ops")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows the KV cache size

    try:
        llm = LLM(args.model, device=args.device, kernels=args.kernels)
    except (OSError, ValueError) as e:  # a missing or invalid model file: the error names it
        sys.exit(f"error: {e}")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompt, outputs):
        print(f"{prompt!r} → {out.text!r}  ({out.finish_reason})")
    num_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{num_tokens} tokens in {elapsed:.2f} s ({num_tokens / elapsed:.1f} tokens/s)")


if __name__ == "__main__":
    main()
