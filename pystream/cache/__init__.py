"""The cache layer: StreamingLLM caches, RoPE maths and the transformers cache/attention adapters."""
