"""The slices as the model sees them: axis permutations and flips (`orientation`), windowing to the training
normalisation or clinical presets (`windowing`, `window_lookup`), a volume's slices as uint8 images
(`slice_source`), a radiograph-like projection (`projection`)."""
