"""What ner-builder writes and the gateway reads: the manifest, tagging schemes, CJK piece layout."""
