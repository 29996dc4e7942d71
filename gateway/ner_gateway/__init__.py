"""ner-gateway: gRPC NER service in front of Triton Inference Server."""
