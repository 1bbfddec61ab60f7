"""The PX definition: streams, scaled arithmetic and the score."""
