"""The adaptation methods a user can choose, by name (light: no torch, for the panel and the parser).

`DEFAULT_METHOD` is the product's default, chosen from the adaptation benchmark
(docs/benchmarks.md, "Choosing the default"); it comes first in `METHODS`.
"""

# dgst-ema: the only method that beat both norm and random selection by +0.02 Dice (intervals above 0)
# on the harder site-C shift while keeping >= 95 % of the site-A Dice, and no worse on site B.
DEFAULT_METHOD = "dgst-ema"
METHODS = ("dgst-ema", "dgst", "full", "bias", "norm", "lora", "random", "static",
           "dgst-split", "dgst-budget")
SPARSE_METHODS = ("dgst", "random", "static", "dgst-ema", "dgst-split", "dgst-budget")
METHOD_HELP = ("dgst-ema (default; this project's variant: DGST selecting on a running average of "
               "|grad|), dgst (the paper's: top-gamma gradients per kernel + norms, biases, head), full, "
               "bias (BitFit), norm, lora, random, static; this project's other variants: "
               "dgst-split (10x learning rate on the sparse entries), dgst-budget (at most 4 x gamma entries per kernel ever move)")
