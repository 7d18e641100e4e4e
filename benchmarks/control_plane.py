"""The control plane's share of TTFT and TBT: sequential requests through a 1P+1D cluster.

With a tiny model a step costs a fraction of a millisecond, so what the messages between the
parent and the instances cost (NewRequest, StartPrefill, Prefilled, an Outputs per decode step)
shows in the time to first token and between tokens as the caller sees them. Prints the medians
over --requests requests, one at a time, each --prompt-len random tokens and --output-len more.

    python benchmarks/control_plane.py --model /path/to/a/tiny/checkpoint
"""
import argparse
import statistics
import time

import torch

from minicake.config import EngineConfig
from minicake.disagg.cluster import Cluster
from minicake.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    config = EngineConfig(model=args.model, device="cpu", num_threads=1, block_size=16, num_kv_blocks=128)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    ttfts, gaps = [], []
    with Cluster(config, prefill_instances=1, decode_instances=1) as cluster:
        vocab = cluster.model_config.vocab_size
        for i in range(args.requests):
            prompt = torch.randint(3, vocab - 3, (args.prompt_len,), generator=g).tolist()
            start, times, done = time.monotonic(), [], False
            cluster.add_request(f"r{i}", prompt, params)
            while not done:
                for out in cluster.get_outputs(timeout=10):
                    times += [time.monotonic()] * len(out.new_token_ids)
                    done = done or out.finished
            ttfts.append(times[0] - start)
            gaps.append((times[-1] - times[0]) / (len(times) - 1))
    print(f"TTFT median {statistics.median(ttfts) * 1e3:.2f} ms, TBT median {statistics.median(gaps) * 1e3:.3f} ms "
          f"({args.requests} requests of {args.prompt_len} + {args.output_len} tokens, one at a time)")


if __name__ == "__main__":
    main()
