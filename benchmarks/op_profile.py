"""Where a compiled XLA:CPU program spends its time, by kind of op, from a `jax.profiler` trace.

Each executed HLO instruction shows up in the trace under its own name; the compiled HLO text says what it is:
a convolution, a matmul, a reduction or elementwise work and copies (for a fusion, by what it fuses), and
whether it belongs to the backward pass (JAX names those ops `transpose(...)`). XLA:CPU runs convolutions
asynchronously: the event is the launch, and an `end: <name>` marker says when it finished, so an op lasts
from its start to that marker. Where ops overlap, each instant is split evenly among those running, so the
kinds add up to the wall time of the traced steps. Convolution FLOPs come from the HLO (window x input
features x output size, leaving out taps on the holes of an input dilation): the achieved GFLOP/s per
convolution is what found the slow ones in our train step.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import math
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from tadsr_jax import flops

KINDS = ("convolution", "matmul", "reduction", "elementwise and copies")
SLOW_CONV_FLOPS_PER_S = 20e9  # a convolution below this runs far from any CPU's matmul peak
_MEASURED = "op_profile: measured call"  # the trace annotation around each measured call

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _dims(shape: str) -> list[int]:
    return [int(d) for d in shape[shape.index("[") + 1 : -1].split(",") if d]


def _instructions(hlo_text: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """name -> {opcode, shape, op_name, calls, operands, rest}; computation -> {opcode: an instruction's name}."""
    instructions, computations, current = {}, collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            match = _COMPUTATION.match(line)
            current = match.group(1) if match else None
            continue
        match = _INSTRUCTION.match(line)
        if not match or current is None:
            continue
        name, shape, opcode, rest = match.groups()
        computations[current].setdefault(opcode, name)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]+)"', rest)
        instructions[name] = {
            "opcode": opcode,
            "shape": shape,
            "op_name": op_name.group(1) if op_name else "",
            "calls": calls.group(1) if calls else None,
            "operands": re.findall(r"%([\w.\-]+)", rest.split(")")[0]),
            "rest": rest,
        }
    return instructions, computations


def _kind(instruction: dict[str, Any], computations: dict[str, dict[str, str]]) -> str:
    ops = set(computations.get(instruction["calls"], ())) if instruction["calls"] else {instruction["opcode"]}
    if "convolution" in ops:
        return "convolution"
    if "dot" in ops:
        return "matmul"
    if ops & {"reduce", "reduce-window"}:
        return "reduction"
    return "elementwise and copies"


def _conv_flops(
    instruction: dict[str, Any], instructions: dict[str, dict[str, Any]], computations: dict[str, dict[str, str]]
) -> float | None:
    """2 x output elements x input features per group x the window taps per output that land on input (not on
    an input dilation's holes: `tadsr_jax.flops.landed_taps`), of a convolution or a fusion around one."""
    if instruction["calls"] and "convolution" in computations.get(instruction["calls"], {}):
        instruction = instructions[computations[instruction["calls"]]["convolution"]]
    if instruction["opcode"] != "convolution" or not instruction["operands"]:
        return None
    lhs = instructions.get(instruction["operands"][0])
    window = re.search(r"window=\{([^}]*)\}", instruction["rest"])
    labels = re.search(r"dim_labels=(\w+)_\w+->(\w+)", instruction["rest"])
    if lhs is None or window is None or labels is None:
        return None
    groups = re.search(r"feature_group_count=(\d+)", instruction["rest"])
    features = _dims(lhs["shape"])[labels.group(1).index("f")] // (int(groups.group(1)) if groups else 1)
    # e.g. "size=3x3 pad=1_2x1_2 lhs_dilate=2x2" -> {"size": ["3", "3"], "pad": ["1_2", "1_2"], ...}
    fields = {key: value.split("x") for key, value in re.findall(r"(\w+)=(\S+)", window.group(1))}
    sizes = [int(size) for size in fields["size"]]
    dimension = lambda name, default: [int(v.split("_")[0]) for v in fields.get(name, [default] * len(sizes))]
    out_dims = _dims(instruction["shape"])
    taps = 1.0
    for i, args in enumerate(
        zip(
            sizes,
            dimension("stride", "1"),
            dimension("rhs_dilate", "1"),
            dimension("pad", "0"),
            dimension("lhs_dilate", "1"),
        )
    ):
        positions = out_dims[labels.group(2).index(str(i))]
        taps *= flops.landed_taps(positions, *args) / positions
    return 2.0 * math.prod(out_dims) * taps * features


def _op_name(name: str, instructions: dict[str, dict[str, Any]], users: dict[str, list[str]]) -> str:
    """The JAX op an instruction comes from; XLA leaves it off some (e.g. a kernel-gradient convolution whose
    layout bitcast carries it), which then take their first user's."""
    seen = set()
    while name not in seen:
        seen.add(name)
        if instructions[name]["op_name"] or not users.get(name):
            return instructions[name]["op_name"]
        name = users[name][0]
    return ""


def _spans(trace: dict[str, Any], instructions: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every executed instruction, async ends included."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    ends = collections.defaultdict(list)
    for e in events:
        if e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"])
    for times in ends.values():
        times.sort()
    spans = []
    for e in events:
        if e["name"] not in instructions:
            continue
        end, times = e["ts"] + e["dur"], ends.get(e["name"], [])
        later = bisect.bisect_left(times, e["ts"])  # this launch's own end marker: the first at or after it
        spans.append((e["ts"], max(end, times[later]) if later < len(times) else end, e["name"]))
    return spans


def _shares(spans: list[tuple[float, float, str]]) -> collections.Counter:
    """Wall time per name, each instant split evenly among the spans running then."""
    edges = sorted([(s, 1, n) for s, _, n in spans] + [(e, -1, n) for _, e, n in spans], key=lambda t: (t[0], t[1]))
    running, shares, last = collections.Counter(), collections.Counter(), None
    for time, change, name in edges:
        total = sum(running.values())
        if last is not None and total and time > last:
            for other, count in running.items():
                shares[other] += (time - last) * count / total
        last = time
        running[name] += change
        if not running[name]:
            del running[name]
    return shares


def summarize(trace: dict[str, Any], hlo_text: str, steps: int) -> dict[str, Any]:
    """Seconds per step by kind and pass, and the convolutions' FLOP rate, of the calls `profile` annotated as
    measured (`steps` of them)."""
    instructions, computations = _instructions(hlo_text)
    users = collections.defaultdict(list)
    for name, instruction in instructions.items():
        for operand in instruction["operands"]:
            users[operand].append(name)
    windows = [
        (e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"] == _MEASURED
    ]
    if len(windows) != steps:
        raise ValueError(f"the trace holds {len(windows)} measured calls, not {steps}")
    spans = [span for span in _spans(trace, instructions) if any(lo <= span[0] <= hi for lo, hi in windows)]
    shares = _shares(spans)
    by_kind = {f"{kind}, {direction}": 0.0 for kind in KINDS for direction in ("forward", "backward")}
    conv_s = conv_flop = slow_s = slow_flop = 0.0
    for name, microseconds in shares.items():
        instruction, seconds = instructions[name], microseconds / 1e6 / steps
        kind = _kind(instruction, computations)
        direction = "backward" if "transpose(" in _op_name(name, instructions, users) else "forward"
        by_kind[f"{kind}, {direction}"] += seconds
        flops = _conv_flops(instruction, instructions, computations)
        if flops is not None:  # once per step, as each instruction runs once per call
            conv_s, conv_flop = conv_s + seconds, conv_flop + flops
            if flops < SLOW_CONV_FLOPS_PER_S * seconds:
                slow_s, slow_flop = slow_s + seconds, slow_flop + flops
    return {
        "step_s": sum(by_kind.values()),
        "by_kind_s": by_kind,
        "convolution_s": conv_s,
        "convolution_flop": conv_flop,
        "slow_convolution_s": slow_s,
        "slow_convolution_flop": slow_flop,
    }


def profile(call: Callable[[], Any], hlo_text: str, steps: int) -> dict[str, Any]:
    """Trace `steps` calls of `call` (each waits for its results) and `summarize` them. One more call runs first
    inside the trace, unmeasured: the profiler's start-up cost lands in it (it doubled a first traced step)."""
    with tempfile.TemporaryDirectory(prefix="tadsr_op_profile_") as directory:
        with jax.profiler.trace(directory):
            jax.block_until_ready(call())
            for _ in range(steps):
                with jax.profiler.TraceAnnotation(_MEASURED):
                    jax.block_until_ready(call())
        (path,) = glob.glob(f"{directory}/plugins/profile/*/*.trace.json.gz")
        with gzip.open(path) as f:
            trace = json.load(f)
    return summarize(trace, hlo_text, steps)
