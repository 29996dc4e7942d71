"""The transport-free core: tokenize -> infer (through triton/) -> decode, with admission and scheduling."""
