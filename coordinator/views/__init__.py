"""What operators see: status, Prometheus metrics, progress bars, the report plot, JSON documents."""
