"""The adaptation methods a user can choose, by name (light: no torch, for the panel and the parser)."""

METHODS = ("dgst", "full", "bias", "norm", "lora", "random", "static")
METHOD_HELP = ("dgst (default: top-gamma gradients per kernel + norms, biases, head), full, "
               "bias (BitFit), norm, lora, random, static")
