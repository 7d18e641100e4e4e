"""The trace-driven simulator: `python -m minicake.sim` replays a Mooncake trace through the Conductor.

`trace` reads the traces, `simulator` plays their requests against simulated instances (the
real `Conductor` decides), `pool_model` is a prefill instance's host pool as keys only,
`metrics` and `plot` summarize a run.
"""
