"""The artifact contract between ner-builder and the gateway: what the builder writes and the gateway reads (the
manifest, tagging schemes, CJK piece layout) and the padding rule of model inputs. Both import it; it imports
neither."""
