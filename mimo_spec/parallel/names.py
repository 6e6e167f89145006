"""Names the layout and its checks share (a leaf module, so neither imports the other for them)."""

DEGREES = ("pp", "dp_replicate", "dp_shard", "tp")  # mesh order, outermost first
LANGUAGE = "language"  # the layout entry of the language model
