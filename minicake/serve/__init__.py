"""Serving: instance processes, the KV data plane between them, and the parent-side `Cluster`.

The OpenAI-compatible HTTP API, metrics and dashboard sit on top of `Cluster`.
`launcher` starts ranks and keeps them from outliving the parent, `instance` runs one
instance's loop (colocated, prefill or decode), `pipeline` cuts a prefill group into stages,
and `cluster.Cluster` is what the offline `LLM` and the HTTP server drive (DESIGN.md 1-2).
"""
