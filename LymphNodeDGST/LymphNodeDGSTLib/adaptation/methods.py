"""The adaptation methods a user can choose, by name (light: no torch, for the panel and the parser).

`DEFAULT_METHOD` is the product's default, chosen from the adaptation benchmark
(docs/benchmarks.md, "Choosing the default"); it comes first in `METHODS`.
"""

# dgst, the paper's method (issue 23's rule): a variant becomes the default only when its interval
# over seeds excludes zero against dgst, norm and random selection on site C, and it is no worse on
# site B. dgst-ema, the default chosen on 2 seeds, did not hold on new seeds (docs/benchmarks.md,
# "Choosing the default").
DEFAULT_METHOD = "dgst"
METHODS = ("dgst", "dgst-ema", "full", "bias", "norm", "lora", "random", "static",
           "dgst-split", "dgst-budget")
SPARSE_METHODS = ("dgst", "random", "static", "dgst-ema", "dgst-split", "dgst-budget")
METHOD_HELP = ("dgst (default; the paper's: top-gamma gradients per kernel + norms, biases, head), "
               "full, bias (BitFit), norm, lora, random, static; this project's variants: dgst-ema "
               "(DGST selecting on a running average of |grad|), dgst-split (10x learning rate on the "
               "sparse entries), dgst-budget (at most 4 x gamma entries per kernel ever move)")
