"""The router: an OpenAI-compatible gateway that spreads requests over engines and OpenAI-compatible servers.

Policies pick workers, strategies turn a request into calls on them; see DESIGN.md, "Router".
"""
