"""The engine: paged KV cache, scheduler and the step loop shared by every backend."""
