"""The engine's local scheduling: `Sequence` (one request inside an engine) and `Scheduler`
(continuous batching with chunked prefill and preemption)."""
