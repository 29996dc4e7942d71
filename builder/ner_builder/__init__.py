"""ner-builder: fine-tune and compile token-classification checkpoints into a Triton model repository."""
