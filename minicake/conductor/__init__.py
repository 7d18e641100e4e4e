"""The Conductor: Mooncake's KVCache-aware global scheduler with admission control.

`conductor` decides (which prefill and decode instance, or a refusal) from a `cost_model`'s
predictions; `live` keeps its view current from a running cluster. The simulator (minicake/sim)
drives the same code on a trace.
"""
