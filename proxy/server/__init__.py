"""The running proxy: app wiring, the request path, admin API, listeners, metrics, workers."""
