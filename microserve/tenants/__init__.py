"""Tenants at the router's front door: API keys, rate and token limits, priorities, the response cache."""
