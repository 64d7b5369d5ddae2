"""Process-wide JAX settings: the XLA:CPU flags the launchers set."""

import json
import os
import subprocess
import sys

import pytest

from tadsr_jax import runtime

CHECK = r"""
import json, re, jax, jax.numpy as jnp
from tadsr_jax import runtime
runtime.set_xla_cpu_flags()
def f(x, k, w):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(-1, 8) @ w
hlo = jax.jit(f).lower(jnp.ones((1, 16, 16, 8)), jnp.ones((3, 3, 8, 8)), jnp.ones((8, 8))).compile().as_text()
ynn_bodies = [body for name, body in re.findall(r"\n(%[\w.]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)
              if re.search(rf"calls={re.escape(name)},[^\n]*__ynn_fusion", hlo)]
assert " convolution(" in hlo and " dot(" in hlo
library = {op: any(f" {op}(" in body for body in ynn_bodies) for op in ("convolution", "dot")}
print(json.dumps(library))
"""


def test_set_xla_cpu_flags_adds_missing_flags_and_keeps_the_users(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    runtime.set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == " ".join(f"--{k}={v}" for k, v in runtime.XLA_CPU_FLAGS.items())
    name = next(iter(runtime.XLA_CPU_FLAGS))
    mine = f"--xla_force_host_platform_device_count=4 --{name}="
    monkeypatch.setenv("XLA_FLAGS", mine)
    runtime.set_xla_cpu_flags()
    assert os.environ["XLA_FLAGS"] == mine


@pytest.mark.slow  # a fresh Python process
def test_flags_send_matmuls_to_ynnpack_and_convolutions_to_xla():
    """In a fresh process (XLA reads the flags once): this jaxlib knows the flag, and it has its effect."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"convolution": False, "dot": True}
