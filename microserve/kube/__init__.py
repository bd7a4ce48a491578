"""Kubernetes API access: in-cluster or kubeconfig configuration and a small client speaking the real REST
protocol for what microserve uses (list and watch pods, the Deployment scale subresource). The router's
Kubernetes discovery source and actuator build on it; it imports nothing of the router."""
