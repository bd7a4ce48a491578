"""The lean HTTP/1.1 server and client the router (and its tests) run on."""
