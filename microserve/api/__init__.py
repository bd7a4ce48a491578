"""The OpenAI API layer shared by the engine and the router: request models, response shapes, errors,
prompt -> token ids and SSE framing, each defined once (docs/api.md lists what is supported)."""
