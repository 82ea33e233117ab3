"""What the fleet tells Prometheus: the metric registry and the node exporter textfile writer."""
