"""Ray: the work queue, the cluster and its placement, the render actor, live metrics."""
