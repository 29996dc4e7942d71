"""Errors the builder reports to the user as one clear line (the CLI turns them into exit code 1)."""


class BuildError(Exception):
    """A checkpoint cannot be built into a Triton model entry (bad input or a failed check)."""
