"""The paged KV cache: block tables and reference counts, prefix caching by chained block keys,
the cache tensors and their memory budget, and the host-memory KV pool."""
