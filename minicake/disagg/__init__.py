"""The prefill/decode split: instance processes, the K/V they hand over, and the parent's `Cluster`.

`launcher` starts the ranks (and keeps them from outliving the parent); `instance` runs one
instance's loop, `prefill_instance` and `decode_instance` its two roles, `pipeline` a prefill
group's stages; `transfer` moves K/V blocks layer by layer over torch.distributed and
`migration` pulls a prefix from another prefill instance; `messages` is the control plane;
`cluster.Cluster` is what the offline `LLM` and the HTTP server drive.
"""
