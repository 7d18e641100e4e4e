"""The server: `python -m minicake.serve`, an OpenAI-compatible HTTP API in front of a `Cluster`.

`api` parses and answers requests (`protocol`: the wire format and its limits), `frontend`
bridges the event loop and the cluster's outputs, `metrics` and `dashboard` report. The
instance processes behind it are minicake/disagg's.
"""
