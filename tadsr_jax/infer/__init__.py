"""One-step x4 super-resolution: pipeline, tiling, colour fix, robust image I/O."""
