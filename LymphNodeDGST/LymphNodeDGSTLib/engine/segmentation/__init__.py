"""Where a CT becomes a label: the segmenter, its backends, the body crop, devices,
the uncertainty pass and the per-node report."""
