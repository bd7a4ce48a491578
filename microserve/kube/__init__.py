"""Kubernetes: a small API client speaking the real REST protocol (list, watch, the scale subresource), the
pods a router discovers, and the Deployment actuator that carries out the autoscaler's decisions."""
