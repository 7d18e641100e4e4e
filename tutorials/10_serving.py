# %% [markdown]
# # Chapter 10: serving it, the OpenAI API, metrics and the benchmark client
#
# Everything so far ran inside a Python program. `python -m minicake.serve` puts it behind
# an HTTP server that speaks OpenAI's API, so any OpenAI client (the `openai` package, curl,
# LangChain, ...) can use it. The frontend process validates requests (a bad parameter is a
# 400 that names it), applies the chat template, tokenizes, hands token ids to the instance
# processes (one colocated engine here; `--prefill 1 --decode 1` for chapter 6's split),
# detokenizes incrementally and streams server-sent events back.
#
# What a server adds that an offline engine does not need: many clients at once (the
# engine's continuous batching, chapter 4, sees them as one stream of requests), streaming,
# aborting a request when its client disconnects (freeing its blocks), and metrics
# (`/metrics`, Prometheus: TTFT, inter-token latency, KV usage, prefix-cache hits).
#
# Files: `minicake/serve/__main__.py` (flags, start, shutdown), `minicake/serve/api.py`
# (the routes), `minicake/serve/protocol.py` (request validation, errors),
# `minicake/serve/frontend.py`, `minicake/serve/metrics.py`, `minicake/bench.py`.

# %%
import atexit
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
FIGURES = Path(os.environ.get("MINICAKE_FIGURES", REPO / "tutorials" / "figures"))
START_TIMEOUT_S = 300

# %% [markdown]
# ## Starting the server
#
# The same command a user types, on a free port, one colocated instance on the CPU with a
# small KV cache. The server prints `minicake serves ... at URL` once it answers.

# %%
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
cmd = [sys.executable, "-m", "minicake.serve", "--colocated", "--device", "cpu", "--port", str(port),
       "--num-kv-blocks", "256", "--max-model-len", "2048"]
server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(min(2, os.cpu_count()))})
atexit.register(server.terminate)  # stop the server even if a check below fails
log: list[str] = []
ready = threading.Event()


def read_server_output() -> None:
    for line in server.stdout:
        log.append(line)
        if line.startswith("minicake serves"):
            ready.set()
    ready.set()  # the server exited


threading.Thread(target=read_server_output, daemon=True).start()
t0 = time.perf_counter()
if not ready.wait(START_TIMEOUT_S) or server.poll() is not None:
    server.kill()
    raise RuntimeError("the server did not start:\n" + "".join(log[-30:]))
base_url = f"http://127.0.0.1:{port}"
print(f"{' '.join(cmd[1:])}\n-> {log[-1].strip()} after {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## The OpenAI client
#
# `openai.OpenAI(base_url=.../v1)` and the usual calls. The model name is the built-in one;
# `/v1/models` lists it. A completion, then a streamed chat completion: each chunk carries
# the new text, and `stream_options={"include_usage": True}` adds token counts at the end,
# including `prompt_tokens_details.cached_tokens` (prefix-cache hits, chapter 5).

# %%
client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120)
model = client.models.list().data[0].id
print(f"models: {model}")
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                       temperature=0)
print(f"completion: {completion.choices[0].text!r} ({completion.choices[0].finish_reason}), "
      f"usage {completion.usage.prompt_tokens} + {completion.usage.completion_tokens} tokens")

messages = [{"role": "user", "content": "Name two colours of the rainbow."}]
chunks, usage, t0 = [], None, time.perf_counter()
ttft = None
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        ttft = ttft or time.perf_counter() - t0
        chunks.append(chunk.choices[0].delta.content)
    usage = chunk.usage or usage
print(f"chat, streamed in {len(chunks)} chunks, first after {ttft * 1e3:.0f} ms: {''.join(chunks)!r}")
print(f"usage: {usage.prompt_tokens} prompt tokens ({usage.prompt_tokens_details.cached_tokens} cached), "
      f"{usage.completion_tokens} completion tokens")

# %% [markdown]
# ## Check: the server generates what the offline engine generates
#
# The same greedy completion from the offline `LLM` API (an in-process engine, chapter 4)
# must be the same text. And a bad request must be refused by name: OpenAI's error envelope
# with status 400 and the offending parameter in `param`.

# %%
from minicake.llm import LLM  # noqa: E402
from minicake.sampling import SamplingParams  # noqa: E402

llm = LLM("smollm2-135m", device="cpu", num_kv_blocks=64, num_threads=min(2, os.cpu_count()))
offline = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=12))[0]
assert offline.text == completion.choices[0].text, (offline.text, completion.choices[0].text)
print(f"offline LLM and server agree: {offline.text!r}")
del llm

bad = httpx.post(f"{base_url}/v1/completions", json={"model": model, "prompt": "hi", "temperature": -1}, timeout=30)
error = bad.json()["error"]
print(f"temperature=-1 -> HTTP {bad.status_code}: param {error['param']!r}, {error['message']!r}")
assert bad.status_code == 400 and error["param"] == "temperature"

# %% [markdown]
# ## Concurrent streams, as the clients see them
#
# Four clients stream at once, arriving 0.3 s apart. Each dot is a token arriving at its
# client. The first tokens come late (TTFT: the prompt's prefill, which shares steps with
# the decodes of the others), then tokens arrive at a steady pace shared by all four: one
# decode step of the batch per token (chapter 4).

# %%
STORY_PROMPT = ("You are a storyteller. Write one short story for children about a cat, a boat and the sea. "
                "Use simple words, give the cat a name, and end happily when the boat comes home.")
timelines: dict[int, list[float]] = {}
start = time.perf_counter()


def stream(i: int) -> None:
    time.sleep(0.3 * i)
    times = timelines.setdefault(i, [time.perf_counter() - start])  # arrival first
    for chunk in client.completions.create(model=model, prompt=STORY_PROMPT + f" Story number {i}:",
                                           max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter() - start)


threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=300)
for i, times in sorted(timelines.items()):
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    print(f"client {i}: TTFT {times[1] - times[0]:.2f} s, {len(times) - 1} chunks, "
          f"mean gap {sum(gaps) / max(1, len(gaps)) * 1e3:.0f} ms")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(9, 3))
for i, times in sorted(timelines.items()):
    ax.plot([times[0], times[1]], [i, i], color="lightgray", lw=6, solid_capstyle="butt",
            label="waiting for the first token" if i == 0 else None)
    ax.scatter(times[1:], [i] * (len(times) - 1), s=8, color="C0", label="a streamed chunk" if i == 0 else None)
ax.set_yticks(range(len(timelines)), [f"client {i}" for i in sorted(timelines)])
ax.set_xlabel("time since the first request (s)")
ax.set_title("four concurrent streams on one colocated CPU instance")
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
fig.tight_layout()
FIGURES.mkdir(parents=True, exist_ok=True)
fig.savefig(FIGURES / "10_concurrent_streams.png", dpi=100)
print(f"wrote {FIGURES / '10_concurrent_streams.png'}")

# %% [markdown]
# ## Metrics
#
# `GET /metrics` is Prometheus text. A few of the series, after the requests above: token
# counters, the TTFT histogram's count and sum, and the prefix cache's query and hit counts
# (in tokens: the four streams share the storyteller instruction, which fills two blocks of 16).

# %%
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

text = httpx.get(f"{base_url}/metrics", timeout=30).text
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        wanted = ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                  "time_to_first_token_seconds_sum", "prefix_cache_queries_total", "prefix_cache_hits_total")
        if sample.name.endswith(wanted):
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            print(f"{sample.name}{{{labels}}} {sample.value:g}")

# %% [markdown]
# ## The benchmark client
#
# `python -m minicake.bench` is shaped like `vllm bench serve`: it sends a workload (random
# prompts, or a Mooncake trace replayed with shared prefixes kept shared), streams every
# response, and reports TTFT, TPOT, inter-token latency, the paper's TBT and end-to-end
# latency, then one JSON line. Here: 4 random requests of 32 prompt tokens and 8 output
# tokens, all sent at once.

# %%
bench = subprocess.run([sys.executable, "-m", "minicake.bench", "--base-url", base_url, "--num-requests", "4",
                        "--input-len", "32", "--output-len", "8", "--rate", "inf"],
                       capture_output=True, text=True, timeout=600)
assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
print(bench.stdout)
report = json.loads(bench.stdout.strip().splitlines()[-1])
assert report["completed"] == report["requests"] == 4, report
print(f"from the JSON line: TTFT mean {report['ttft_ms']['mean']:.0f} ms, TPOT mean {report['tpot_ms']['mean']:.0f} ms, "
      f"{report['output_throughput']:.1f} output tokens/s")

# %%
server.terminate()  # SIGTERM: the server stops its instances and exits
print(f"server exited with code {server.wait(timeout=60)}")

# %% [markdown]
# ## What to read next
#
# - `minicake/serve/api.py`: how a stream is turned into SSE chunks and how a client
#   disconnect aborts its request.
# - `docs/serving.md`: every flag and endpoint, the limits on hostile input, failures and shutdown.
# - `benchmarks/serving.py`: colocated against 1 prefill + 1 decode through this server, on
#   the same requests.
# - `--prefill 2 --decode 1 --admission predictive --ttft-slo 5 --tbt-slo 0.5`: chapters 6,
#   8 and 9 behind this API; the cluster asks the Conductor (`minicake/conductor/live.py`) where
#   each request runs; a refused request gets HTTP 429 with `Retry-After`, or 400
#   `slo_unreachable` when it would miss an SLO even on an idle cluster.
