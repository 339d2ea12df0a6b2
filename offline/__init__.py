"""SpenseGPT: one-shot post-training pruning into the Spense format (installed as ``vllm_spense.offline``)."""
