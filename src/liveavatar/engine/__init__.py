"""Streaming generation: KV cache, sink and position policies, and the engines (sequential, stream_batch, tpp)."""
