"""gRPC transport: the servicer, proto conversion, interceptors (errors, auth, limits), health, TLS, the server."""
