"""Serving: instance processes (cluster), the OpenAI-compatible HTTP API, metrics, dashboard."""
