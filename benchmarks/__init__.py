"""Cost measurements for jlora (FLOPs read from XLA), and the small models they run on."""
