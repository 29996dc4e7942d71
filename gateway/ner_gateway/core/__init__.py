"""The transport-free core: tokenize -> windows -> batched inference (through its ports) -> decode, with admission."""
