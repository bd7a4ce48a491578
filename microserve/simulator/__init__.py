"""`microserve simulate`: the real scheduler, KV cache, policies and strategies on a virtual clock.

`clock` is the virtual event loop, `replica` one engine, `handle` the worker verbs, `host` the router."""
