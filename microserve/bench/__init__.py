"""`microserve bench`: a load generator for any OpenAI-compatible endpoint, with vLLM's serving metrics.

Workloads and arrival processes make the requests, the runner sends them, metrics and report summarize."""
