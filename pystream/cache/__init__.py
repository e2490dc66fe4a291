"""The cache engine: the C++ ring adapter, RoPE, StreamingKV and the transformers adapter."""
