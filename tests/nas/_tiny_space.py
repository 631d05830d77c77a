"""The tiny 3-block digits space the DNA and reliability tests search (3 ops, 2 layers per block)."""

TINY_SPACE = {
    "name": "tiny-digits",
    "stem_channels": 4,
    "ops": [{"kind": "skip"}, {"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 2}],
    "blocks": [
        {"out_channels": 4, "stride": 1, "layers": 2},
        {"out_channels": 6, "stride": 2, "layers": 2},
        {"out_channels": 8, "stride": 2, "layers": 2},
    ],
}
