import os

# Keep the test process single-host CPU and quiet; tests that need simulated devices set XLA_FLAGS themselves
# in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
