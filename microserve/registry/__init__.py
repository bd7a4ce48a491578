"""Where engines announce themselves and routers find them: the etcd client, the record an engine
publishes, and the engine's side of self-registration (a lease kept alive, withdrawn on stop)."""
