"""The engine's HTTP API: OpenAI routes, health, load and metrics."""
