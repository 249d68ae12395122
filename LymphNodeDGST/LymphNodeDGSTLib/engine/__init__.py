"""The engine: model store, checkpoints and their validation, architectures, the segmenter, images and
geometry, the node report, devices (CT -> label). Imports nothing above it."""
