"""microserve: LLM serving from a fleet of model engines behind a programmable router."""

__version__ = "0.1.0"
